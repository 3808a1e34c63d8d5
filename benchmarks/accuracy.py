"""Accuracy per density, trained centrally: DRESS (one set of weights) vs single pruned networks vs a slimmable one.

    python -m benchmarks.accuracy                  # every task × seed, writes benchmarks/results/accuracy.{json,md}
    python -m benchmarks.accuracy --resume         # continue a stopped one (the JSON is written after every run)
    python -m benchmarks.accuracy --tasks fashion-mnist-cnn-w2 --seeds 0 --epochs 1 --out /tmp/acc.json  # a look

A task is ``DATASET-MODEL`` or ``DATASET-MODEL-wWIDTH`` (``contracts.settings.task_name``). Two by default:
``fashion-mnist-cnn`` (the fleet's model) and ``fashion-mnist-cnn-w2``, the capacity task: the same cnn at
2/16 of the width, where the sparsest subnet (330 weights in its row-sparse layers) cannot hold what the densest
(3.2k) learns, so a denser subnet has to be worth something (issue 25 asks d=1 − d=0.1 ≥ 2 pt centrally: the
widest cnn that gives it; at 3/16, ``fashion-mnist-cnn-w3``, DRESS's gap was 1.79 ± 1.23 pt over 3 seeds).
The default --out also rewrites the centralized reference simulation reports compare their tiers with
(``simulations/centralized.json``).

Targets (issue 2): every DRESS subnet within 1.0 point of the pruned network at its density; DRESS above
the slimmable network at every level below 1.0.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader

from benchmarks.common import Task, command, machine, markdown_table, parse_task, write_json
from benchmarks.federated_stats import ci_text, mean_ci
from dress_model.baselines.pruned import pruned_networks
from dress_model.baselines.slimmable import slim_params, slimmable_like
from dress_model.data import load_dataset
from dress_model.models import Architecture, create_model
from dress_model.sparsity import parse_densities
from dress_model.training import StepCallback, TrainConfig, evaluate, train
from simulations.centralized import write_reference

console = Console()
RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "accuracy.json"
METHODS = ("dress", "pruned", "slimmable")
TASKS = "fashion-mnist-cnn,fashion-mnist-cnn-w2"


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


def run_pruned(arch: Architecture, train_loader, test_loader, config: TrainConfig, finetune_epochs: float,
               on_step=None) -> list[tuple]:
    torch.manual_seed(config.extra.get("seed", 0))
    finetune = replace(config, epochs=finetune_epochs, lr=config.lr / 5)
    return pruned_networks(arch, train_loader, test_loader, config, finetune, on_step)


def setup(dataset: str, model: str, densities: str, seed: int, width: int = Task.width
          ) -> tuple[Architecture, DataLoader, DataLoader]:
    """The architecture and loaders every accuracy-style benchmark trains and tests with."""
    train_set, test_set = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    arch = Architecture(
        name=model,
        densities=parse_densities(densities),
        in_channels=train_set.in_channels,
        num_classes=train_set.num_classes,
        image_size=train_set.images.shape[-1],
        width=width,
    )
    return arch, train_set.loader(128, shuffle=True, seed=seed), test_set.loader(512, shuffle=False)


def summary(rows: list[dict]) -> list[dict]:
    """Per task, method and density: mean ± 95 % CI over the seeds run, and the seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["method"], r["density"]), []).append(r)
    out = []
    for (task, method, density), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        mean, ci = mean_ci(r["accuracy"] for r in rs)
        out.append({"task": task, "method": method, "density": density, "params": rs[0]["params"],
                    "accuracy": ci_text(mean, ci),
                    "seeds": ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))})
    return out


def gaps(rows: list[dict]) -> list[dict]:
    """What the densest subnet buys over the sparsest, per task and method: d=max − d=min, paired by seed."""
    by: dict[tuple, dict[int, dict[float, float]]] = {}
    for r in rows:
        by.setdefault((r["task"], r["method"]), {}).setdefault(r["seed"], {})[r["density"]] = r["accuracy"]
    out = []
    for (task, method), seeds in sorted(by.items()):
        diffs = [acc[max(acc)] - acc[min(acc)] for acc in seeds.values() if len(acc) > 1]
        if diffs:
            mean, ci = mean_ci(diffs)
            out.append({"task": task, "method": method,
                        "densest − sparsest": ci_text(mean, ci, sign="+"),
                        "seeds": len(diffs)})
    return out


def report(result: dict, md: Path) -> None:
    """Write the markdown: every cell a mean over the seeds listed in the JSON's rows."""
    rows = result["rows"]
    text = [f"# Accuracy per density, trained centrally — {', '.join(result['tasks'])}", "",
            f"`{result['command']}`", "",
            f"{result['epochs']:g} epochs (pruned: then {result['finetune_epochs']:g} of fine-tuning per density); "
            "whole test split; mean ± 95 % CI over the seeds listed (t-distribution; one seed has none).", "",
            markdown_table(summary(rows), ["task", "method", "density", "params", "accuracy", "seeds"]),
            "What the densest subnet buys over the sparsest (points, paired by seed):", "",
            markdown_table(gaps(rows), ["task", "method", "densest − sparsest", "seeds"]),
            "Training seconds per run: " + ", ".join(f"{k} {v}" for k, v in result["train_seconds"].items())]
    md.write_text("\n".join(text) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=TASKS, help="comma-separated DATASET-MODEL[-wWIDTH]")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--densities", default="1,0.5,0.25,0.1")
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--finetune-epochs", type=float, default=4, help="pruned baseline: fine-tuning per density")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--resume", action="store_true", help="keep the runs --out already holds, run the rest")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results JSON; the default one also rewrites the centralized reference simulation reports "
                        "compare with (simulations/centralized.json)")
    args = p.parse_args()
    try:
        tasks = [parse_task(t) for t in args.tasks.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        raise SystemExit(f"--tasks or --seeds: {e}") from None
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; expected some of {', '.join(METHODS)}")

    settings = {"epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "densities": args.densities}
    result = {"tasks": [t.name for t in tasks], "seeds": seeds, "methods": methods, **settings,
              "command": command(), "machine": machine(), "train_seconds": {}, "rows": []}
    if args.resume and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if any(previous.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"{args.out} was trained with other settings than {settings}: another --out")
        result["rows"], result["train_seconds"] = previous["rows"], previous["train_seconds"]
        # a resume may run other tasks or seeds: the file names every one its rows hold
        result["tasks"] = list(dict.fromkeys(previous["tasks"] + result["tasks"]))
        result["seeds"] = sorted(set(previous["seeds"]) | set(seeds))
    done = {(r["task"], r["seed"], r["method"]) for r in result["rows"]}
    with Progress(console=console) as progress:
        for task in tasks:
            for seed in seeds:
                arch, train_loader, test_loader = setup(task.dataset, task.model, args.densities, seed, task.width)
                config = TrainConfig(epochs=args.epochs, extra={"seed": seed})
                for method in methods:
                    if (task.name, seed, method) in done:
                        continue
                    start, on_step = time.perf_counter(), reporter(progress, f"{task.name} seed {seed} {method}")
                    if method == "dress":
                        runs = run_dress(arch, train_loader, test_loader, config, on_step)
                    elif method == "slimmable":
                        runs = run_slimmable(arch, train_loader, test_loader, config, on_step)
                    else:
                        runs = run_pruned(arch, train_loader, test_loader, config, args.finetune_epochs, on_step)
                    result["train_seconds"][f"{task.name} {seed} {method}"] = round(time.perf_counter() - start, 1)
                    result["rows"] += [{"task": task.name, "seed": seed, "method": method, "density": d,
                                        "params": n, "accuracy": round(a, 2)} for d, n, a in runs]
                    write_json(args.out, result)
                    if args.out.resolve() == DEFAULT_OUT.resolve():  # the committed results: the shipped reference
                        write_reference(result["rows"], command())
    md = args.out.with_suffix(".md")
    report(result, md)
    console.print(markdown_table(gaps(result["rows"]), ["task", "method", "densest − sparsest", "seeds"]))
    console.print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
