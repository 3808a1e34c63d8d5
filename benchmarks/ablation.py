"""Ablations behind DRESS's undocumented choices: batch-norm handling and the re-ranking schedule.

    python -m benchmarks.ablation      # writes benchmarks/results/ablation.{json,md}

The paper leaves these open; the defaults in dress_model are the winners of this run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from benchmarks.accuracy import RESULTS, reporter, run_dress, setup
from benchmarks.common import command, machine, markdown_table, write_json
from dress_model.training import TrainConfig

console = Console()

# name -> (architecture changes, training-config changes)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "switchable-bn, rerank/100": ({"bn_affine": "per-density"}, {"rerank_every": 100}),
    "shared-affine + recalibrated-bn, rerank/100": ({"bn_affine": "shared"}, {"rerank_every": 100, "recalibrate_batches": 50}),
    "switchable-bn + recalibrated-bn, rerank/100": ({"bn_affine": "per-density"}, {"rerank_every": 100, "recalibrate_batches": 50}),
    "switchable-bn, rerank/20": ({"bn_affine": "per-density"}, {"rerank_every": 20}),
    "switchable-bn, order fixed at init": ({"bn_affine": "per-density"}, {"rerank_every": 0}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--densities", default="1,0.5,0.25,0.1")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ablation.json")
    args = p.parse_args()

    arch, train_loader, test_loader = setup(args.dataset, args.model, args.densities, args.seed)
    base = TrainConfig(epochs=args.epochs, extra={"seed": args.seed})
    rows = []
    with Progress(console=console) as progress:
        for name, (arch_change, config_change) in VARIANTS.items():
            start = time.perf_counter()
            result = run_dress(replace(arch, **arch_change), train_loader, test_loader, replace(base, **config_change),
                               reporter(progress, name))
            seconds = round(time.perf_counter() - start, 1)
            row = {"variant": name, "train_seconds": seconds}
            row.update({f"acc@{d:g}": round(a, 2) for d, _, a in result})
            rows.append(row)
    write_json(args.out, {"dataset": args.dataset, "model": args.model, "epochs": args.epochs,
                          "command": command(), "machine": machine(), "rows": rows})
    table = markdown_table(rows, list(rows[0]))
    md = args.out.with_suffix(".md")
    md.write_text(f"# DRESS ablation — {args.model} on {args.dataset}, {args.epochs:g} epochs\n\n`{command()}`\n\n{table}")
    console.print(table)


if __name__ == "__main__":
    main()
