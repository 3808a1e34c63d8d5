"""One centralized DRESS experiment end to end: data, model, joint training, evaluation, checkpoint, metrics.

What `dress-fleet train` runs; benchmarks and tests call it the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from dress_model.checkpoint import atomic_write, save_checkpoint
from dress_model.data import load_dataset
from dress_model.models import create_model
from dress_model.training import StepCallback, TrainConfig, evaluate, train


@dataclass(frozen=True)
class Experiment:
    dataset: str
    model: str
    densities: tuple[float, ...]  # ascending
    config: TrainConfig
    batch_size: int = 128
    width: int = 16
    bn_affine: Literal["per-density", "shared"] = "per-density"
    train_subset: int = 0  # the first N training images; 0 = all
    data_dir: Path | None = None
    download: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Outcome:
    checkpoint: Path
    metrics: Path
    rows: list[tuple[float, int, float]]  # (density, weights, test accuracy %), ascending density
    train_s: float
    images: int


def run_experiment(exp: Experiment, out: Path, on_step: StepCallback | None = None) -> Outcome:
    """Train one backbone whose nested subnets share its weights; write model.safetensors + metrics.json.

    Raises DataError for missing or corrupt data, ValueError for settings the model cannot take; nothing is
    written until training has finished."""
    train_set = load_dataset(exp.dataset, "train", exp.data_dir, exp.download)
    test_set = load_dataset(exp.dataset, "test", exp.data_dir, exp.download)
    if exp.train_subset:
        train_set = train_set.subset(range(min(exp.train_subset, len(train_set))))
    torch.manual_seed(exp.seed)
    net = create_model(exp.model, exp.densities, in_channels=train_set.in_channels,
                       num_classes=train_set.num_classes, image_size=train_set.images.shape[-1], width=exp.width,
                       bn_affine=exp.bn_affine)
    exp.config.weights_for(exp.densities)  # bad loss weights fail before minutes of training
    start = time.perf_counter()
    train(net, train_set.loader(exp.batch_size, shuffle=True, seed=exp.seed), exp.config, on_step)
    train_s = time.perf_counter() - start
    accuracy = evaluate(net, test_set.loader(512, shuffle=False))
    rows = [(d, net.subnet_params(d), accuracy[d]) for d in exp.densities]

    meta = {"dataset": exp.dataset, "epochs": exp.config.epochs, "seed": exp.seed, "bn_affine": exp.bn_affine,
            "train_seconds": round(train_s, 1)}
    checkpoint = save_checkpoint(net, out / "model.safetensors", meta)
    metrics = {**meta, "model": exp.model, "checkpoint": str(checkpoint),
               "config": {k: v for k, v in asdict(exp.config).items() if k != "extra"},
               "densities": [{"density": d, "params": p, "accuracy": a} for d, p, a in rows]}
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    return Outcome(checkpoint, out / "metrics.json", rows, train_s, len(train_set))
