"""Accuracy per density: DRESS (one set of weights) vs single compressed networks vs a slimmable network.

    python benchmarks/accuracy.py                      # full run, writes benchmarks/results/accuracy.{json,md}
    python benchmarks/accuracy.py --epochs 1 --out /tmp/acc.json   # a quick look

Targets (issue 2): every DRESS subnet within 1.0 point of the pruned network at its density; DRESS above
the slimmable network at every level below 1.0.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader

from common import command, machine, markdown_table, write_json
from dress_model.baselines.pruned import pruned_networks
from dress_model.baselines.slimmable import slim_params, slimmable_like
from dress_model.data import load_dataset
from dress_model.models import Architecture, create_model
from dress_model.sparsity import parse_densities
from dress_model.training import StepCallback, TrainConfig, evaluate, train

console = Console()
RESULTS = Path(__file__).parent / "results"


def reporter(progress: Progress, name: str) -> StepCallback:
    task = progress.add_task(name, total=None)

    def on_step(step: int, total: int, losses: dict[float, float]) -> None:
        if step == 1 and progress.tasks[task].completed > 0:  # a new training phase of the same method
            progress.reset(task)
        progress.update(task, completed=step, total=total)

    return on_step


def run_dress(arch: Architecture, train_loader, test_loader, config: TrainConfig, on_step=None) -> list[tuple]:
    torch.manual_seed(config.extra.get("seed", 0))
    model = create_model(arch)
    train(model, train_loader, config, on_step)
    acc = evaluate(model, test_loader)
    return [(d, model.subnet_params(d), acc[d]) for d in model.densities]


def run_slimmable(arch: Architecture, train_loader, test_loader, config: TrainConfig, on_step=None) -> list[tuple]:
    torch.manual_seed(config.extra.get("seed", 0))
    model = slimmable_like(create_model(arch))
    train(model, train_loader, replace(config, rerank_every=0), on_step)
    acc = evaluate(model, test_loader)
    return [(d, slim_params(model, d), acc[d]) for d in model.densities]


def setup(dataset: str, model: str, densities: str, seed: int) -> tuple[Architecture, DataLoader, DataLoader]:
    """The architecture and loaders every accuracy-style benchmark trains and tests with."""
    train_set, test_set = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    arch = Architecture(
        name=model,
        densities=parse_densities(densities),
        in_channels=train_set.in_channels,
        num_classes=train_set.num_classes,
        image_size=train_set.images.shape[-1],
    )
    return arch, train_set.loader(128, shuffle=True, seed=seed), test_set.loader(512, shuffle=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--densities", default="1,0.5,0.25,0.1")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--finetune-epochs", type=float, default=5, help="pruned baseline: fine-tuning per density")
    p.add_argument("--methods", default="dress,pruned,slimmable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    args = p.parse_args()

    arch, train_loader, test_loader = setup(args.dataset, args.model, args.densities, args.seed)
    config = TrainConfig(epochs=args.epochs, extra={"seed": args.seed})
    rows, seconds = [], {}
    with Progress(console=console) as progress:
        for method in args.methods.split(","):
            start = time.perf_counter()
            on_step = reporter(progress, method)
            if method == "dress":
                result = run_dress(arch, train_loader, test_loader, config, on_step)
            elif method == "slimmable":
                result = run_slimmable(arch, train_loader, test_loader, config, on_step)
            elif method == "pruned":
                torch.manual_seed(args.seed)
                finetune = replace(config, epochs=args.finetune_epochs, lr=config.lr / 5)
                result = pruned_networks(arch, train_loader, test_loader, config, finetune, on_step)
            else:
                raise SystemExit(f"unknown method {method!r}; expected dress, pruned or slimmable")
            seconds[method] = round(time.perf_counter() - start, 1)
            rows += [{"method": method, "density": d, "params": n, "accuracy": round(a, 2)} for d, n, a in result]

    result = {
        "dataset": args.dataset,
        "model": args.model,
        "command": command(),
        "machine": machine(),
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "train_seconds": seconds,
        "rows": rows,
    }
    write_json(args.out, result)
    table = markdown_table(sorted(rows, key=lambda r: (-r["density"], r["method"])), ["method", "density", "params", "accuracy"])
    md = args.out.with_suffix(".md")
    md.write_text(f"# Accuracy per density — {args.model} on {args.dataset}\n\n`{result['command']}`\n\n{table}")
    console.print(table)
    console.print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
