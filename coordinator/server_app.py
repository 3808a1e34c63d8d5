"""The Flower ServerApp that runs federated DRESS, in deployment and in simulation alike.

Its settings arrive as Flower run config (``flwr run ... --run-config``); ``RUN_CONFIG_DEFAULTS`` lists every
key. Each finished round is appended to ``<state-dir>/rounds.jsonl`` for the CLI's live view and report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from coordinator.registry.repository import Registry
from coordinator.strategy import DressStrategy, RoundLog, RoundSettings
from dress_model.data import load_dataset
from dress_model.models import DressModel, model_for_dataset
from dress_model.sparsity import parse_densities

log = logging.getLogger(__name__)
app = ServerApp()

ROUNDS_LOG = "rounds.jsonl"


def read_rounds(state_dir: Path) -> list[dict]:
    """The per-round entries the ServerApp appended so far (one JSON object a line)."""
    path = state_dir / ROUNDS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RUN_CONFIG_DEFAULTS: dict[str, int | float | str] = {
    "num-rounds": 3,
    "fraction": 0.1,
    "min-devices": 1,
    "wait-for-nodes": 1,
    "densities": "1,0.5,0.25,0.1",
    "model": "cnn",
    "width": 16,
    "dataset": "fashion-mnist",
    "partition": "iid",
    "seed": 0,
    "epochs": 1.0,
    "lr": 0.05,
    "batch-size": 32,
    "max-examples": 0,
    "eval-examples": 2000,
    "db-url": "",
    "state-dir": "state",
}


def settings_from(context: Context) -> dict[str, int | float | str]:
    cfg = {**RUN_CONFIG_DEFAULTS, **dict(context.run_config)}
    unknown = sorted(set(cfg) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown}; expected {sorted(RUN_CONFIG_DEFAULTS)}")
    return cfg


def initial_model(cfg: Mapping[str, Any]) -> DressModel:
    """The model a run starts from (also what agents fetch before round 1 publishes a version)."""
    return model_for_dataset(str(cfg["model"]), parse_densities(str(cfg["densities"])), str(cfg["dataset"]),
                             int(cfg["width"]))


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = 300.0) -> None:
    """Virtual and real SuperNodes may register after the ServerApp starts."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {count} nodes joined in {timeout_s:.0f} s")
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings_from(context)
    state_dir = Path(str(cfg["state-dir"]))
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    train_set = load_dataset(str(cfg["dataset"]), "train")
    test_set = load_dataset(str(cfg["dataset"]), "test")
    model = initial_model(cfg)
    # Server-held data: a fixed slice of the training split recalibrates BN; the test split evaluates.
    calibration = train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:1024])
    test = test_set.subset(range(min(int(cfg["eval-examples"]) or len(test_set), len(test_set))))
    settings = RoundSettings(
        fraction=float(cfg["fraction"]),
        min_devices=int(cfg["min-devices"]),
        epochs=float(cfg["epochs"]),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch-size"]),
        dataset=str(cfg["dataset"]),
        partition=str(cfg["partition"]),
        seed=seed,
        max_examples=int(cfg["max-examples"]),
        checkpoint_dir=state_dir / "checkpoints",
    )
    rounds_log = state_dir / ROUNDS_LOG

    def on_round(entry: RoundLog) -> None:
        with open(rounds_log, "a") as f:
            f.write(json.dumps(asdict(entry)) + "\n")  # float density keys become strings

    registry = Registry(str(cfg["db-url"]) or None, state_dir=state_dir)
    try:
        strategy = DressStrategy(
            model, registry, settings, calibration.loader(128, seed=seed), test.loader(512, shuffle=False), on_round
        )
        wait_for_nodes(grid, int(cfg["wait-for-nodes"]))
        strategy.start(grid, ArrayRecord(), num_rounds=int(cfg["num-rounds"]), timeout=3600)
    finally:
        registry.close()
