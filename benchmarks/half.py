"""Float16 transfer: what a packed file weighs and what its subnets lose when its floats travel as float16.

Each checkpoint (a `dress-fleet train` model or a fleet's round checkpoint) is packed up to every density it
holds, written in float32 and in float16, loaded back (computed in float32 either way) and evaluated on the
whole test split of its dataset.

    python -m benchmarks.half --checkpoint runs/federated-bench/dress-iid-0/state/checkpoints/round-30.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import command, machine, markdown_table, write_json
from dress_model.checkpoint import atomic_write, load_checkpoint
from dress_model.data import load_dataset
from dress_model.packed import PackedModel, pack_checkpoint
from dress_model.training import evaluate

RESULTS = Path(__file__).parent / "results"


def measure(path: Path, dataset: str | None) -> list[dict[str, Any]]:
    """One row per density: test accuracy and file bytes in float32 and float16."""
    model, header = load_checkpoint(path)
    name = dataset or header.get("meta", {}).get("dataset", "fashion-mnist")
    test = load_dataset(name, "test").loader(512, shuffle=False)
    packed = pack_checkpoint(model)
    full, half = packed.to_bytes(), packed.to_bytes(half=True)
    accuracy = {kind: evaluate(PackedModel.from_bytes(data), test) for kind, data in (("fp32", full), ("fp16", half))}
    dense = 4 * model.subnet_params(model.densities[-1])
    return [{"checkpoint": str(path), "model": model.arch.name, "dataset": name, "density": d,
             "accuracy_fp32": round(accuracy["fp32"][d], 2), "accuracy_fp16": round(accuracy["fp16"][d], 2),
             "change": round(accuracy["fp16"][d] - accuracy["fp32"][d], 2), "bytes_fp32": len(full),
             "bytes_fp16": len(half), "dense_fp32": dense} for d in reversed(model.densities)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", required=True, help="repeat for several")
    p.add_argument("--dataset", help="override the dataset the checkpoint records")
    p.add_argument("--out", type=Path, default=RESULTS / "half.json")
    args = p.parse_args()
    rows = [row for path in args.checkpoint for row in measure(path, args.dataset)]
    write_json(args.out, {"command": command(), "machine": machine(), "rows": rows})
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(
        f"# Float16 transfer of packed models\n\n`{command()}`\n\nWhole test split; the file holds every density up "
        "to 1; computed in float32 after loading either file. *change*: float16 minus float32, in points.\n\n"
        + markdown_table(rows, ["checkpoint", "model", "density", "accuracy_fp32", "accuracy_fp16", "change",
                                "bytes_fp32", "bytes_fp16", "dense_fp32"])))
    print(markdown_table(rows, ["model", "density", "accuracy_fp32", "accuracy_fp16", "change", "bytes_fp16"]))


if __name__ == "__main__":
    main()
