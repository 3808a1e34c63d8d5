"""Packed banded kernels vs the best dense torch path vs torch.sparse CSR, one layer at a time.

Every candidate for a (layer, batch, density) is timed in the same alternating rounds, so a CPU
shared with other work slows them alike and the ratios stay meaningful; the reported figure is
the median of all recorded calls (see `median_us`).

    .venv/bin/python -m benchmarks.kernel_bench --quick                # < 1 minute
    .venv/bin/python -m benchmarks.kernel_bench --json benchmarks/results/kernel.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import mkldnn as mkldnn_utils  # noqa: E402

from benchmarks.common import command, machine, median_us, write_json  # noqa: E402
from dress_model.kernels import kernel_isa, packed_conv2d, packed_linear  # noqa: E402
from dress_model.models import create_model  # noqa: E402
from dress_model.packed import PackedModel, pack_checkpoint  # noqa: E402
from dress_model.packed_format import band_table, pack_rows, prefix_lengths  # noqa: E402
from dress_model.sparsity import keep_count  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)


@dataclass(frozen=True)
class LayerCase:
    op: str  # "linear", "conv1x1", "conv3x3"
    rows: int  # out features / channels
    cin: int  # in features / channels
    k: int = 1  # conv kernel size
    hw: int = 0  # conv input height = width
    padding: int = 0

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.cin}" + (f" @{self.hw}x{self.hw}" if self.op != "linear" else "")

    @property
    def cols(self) -> int:
        return self.cin * self.k * self.k


LINEAR = [LayerCase("linear", 512, 512), LayerCase("linear", 1024, 1024), LayerCase("linear", 4096, 1024)]
CONV = [LayerCase("conv1x1", 256, 256, 1, 8, 0), LayerCase("conv3x3", 128, 128, 3, 16, 1)]


def _packed_candidate(
    case: LayerCase, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor
) -> Callable[[], object]:
    """The layer at the density whose band prefix is `bands`, straight from the packed buffers."""
    if case.op == "linear":
        return lambda: packed_linear(x, values, indices, bands, case.rows)
    return lambda: packed_conv2d(x, values, indices, bands, case.rows, case.k, 1, case.padding)


def _dense_candidates(case: LayerCase, weight: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Plain functional call and oneDNN with the weight prepacked once (torch.utils.mkldnn)."""
    if case.op == "linear":
        layer = nn.Linear(case.cin, case.rows, bias=False)
        layer.weight.data.copy_(weight)
        prepacked = mkldnn_utils.to_mkldnn(layer.eval())
        return {"functional": lambda: F.linear(x, weight), "onednn": lambda: prepacked(x)}
    w4 = weight.view(case.rows, case.cin, case.k, case.k)
    layer = nn.Conv2d(case.cin, case.rows, case.k, padding=case.padding, bias=False)
    layer.weight.data.copy_(w4)
    prepacked = mkldnn_utils.to_mkldnn(layer.eval())
    return {
        "functional": lambda: F.conv2d(x, w4, padding=case.padding),
        # oneDNN's blocked activation layout is part of its cost when the rest of the model is dense torch.
        "onednn": lambda: prepacked(x.to_mkldnn()).to_dense(),
    }


def _csr_candidate(case: LayerCase, masked: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
    """CSR weight times the input columns; a conv pays for im2col (unfold) as CSR has no conv."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = masked.to_sparse_csr()
    if case.op == "linear":
        xt = x.t().contiguous()
        return lambda: torch.sparse.mm(csr, xt).t()
    b, hw = x.shape[0], case.hw
    oh = hw + 2 * case.padding - case.k + 1

    def conv() -> torch.Tensor:
        cols = F.unfold(x, case.k, padding=case.padding)  # [B, C*k*k, L]
        y = torch.sparse.mm(csr, cols.permute(1, 0, 2).reshape(case.cols, -1))  # [rows, B*L]
        return y.view(case.rows, b, oh, oh).permute(1, 0, 2, 3)

    return conv


def bench_layers(threads: int, quick: bool, console: Console | None = None) -> list[dict[str, Any]]:
    """One row per (layer, batch, density): packed vs best dense vs CSR, microseconds."""
    torch.set_num_threads(threads)
    budget, lo, hi = (0.6, 3, 200) if quick else (2.5, 10, 2000)
    rows_out: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    ascending = sorted(DENSITIES)
    for case, batches in [(c, (1, 32)) for c in LINEAR] + [(c, (1, 8)) for c in CONV]:
        weight = torch.randn(case.rows, case.cols, generator=gen) / math.sqrt(case.cols)
        order = torch.argsort(weight.abs(), dim=1, descending=True)  # magnitude importance, as DRESS ranks
        ks = prefix_lengths(tuple(ascending), case.cols)  # production's packer and rounding rule
        values, indices = pack_rows(weight, order, ks)
        bands = band_table(ks, case.rows)
        for batch in batches:
            if case.op == "linear":
                x = torch.randn(batch, case.cin, generator=gen)
            else:
                x = torch.randn(batch, case.cin, case.hw, case.hw, generator=gen)
            dense = _dense_candidates(case, weight, x)
            for density in DENSITIES:
                nb = ascending.index(density) + 1
                k = keep_count(density, case.cols)
                keep = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order[:, :k], True)
                fns = {
                    "packed": _packed_candidate(case, x, values, indices, bands[:nb]),
                    **dense,
                    "csr": _csr_candidate(case, weight * keep, x),
                }
                with torch.inference_mode():
                    t = median_us(fns, budget, lo, hi)
                row = {
                    "op": case.op,
                    "shape": case.shape,
                    "batch": batch,
                    "density": density,
                    "packed_us": round(t["packed"], 1),
                    "dense_best_us": round(min(t["functional"], t["onednn"]), 1),
                    "csr_us": round(t["csr"], 1),
                }
                rows_out.append(row)
                if console is not None:
                    console.log(f"{case.op} {case.shape} B={batch} d={density}: {row['packed_us']} us packed")
    return rows_out


MODEL_DENSITIES = (0.05, 0.1, 0.25, 0.5, 1.0)
PARTS = ("layers", "model", "storage")  # what one run measures (--parts)


def _trained_like(name: str, channels: int, size: int):
    """Random weights ranked by magnitude: speed and bytes do not depend on what the weights learned."""
    torch.manual_seed(0)
    model = create_model(name, MODEL_DENSITIES, in_channels=channels, image_size=size)
    model.rerank()
    return model.eval()


class _AnyBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Plain BN for [N, C] and [N, C, H, W] alike (the family below does not say which a norm follows)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


class _DenseFamily:
    """The same network as a plain dense torch model: nn.Conv2d, nn.Linear, BN — what a user would run."""

    def __init__(self, arch: Any) -> None:
        pass

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, role: str = "body") -> nn.Module:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)

    def linear(self, fin: int, fout: int, role: str = "body") -> nn.Module:
        return nn.Linear(fin, fout)

    def norm(self, c: int) -> nn.Module:
        return _AnyBatchNorm(c)


def _dense_model_candidates(name: str, channels: int, size: int, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The dense network three ways: torch eager, channels-last, and TorchScript frozen and optimised for
    inference (conv-BN folding, oneDNN-prepacked convolutions). A way this torch build cannot take is skipped."""
    dense = create_model(name, (1.0,), in_channels=channels, image_size=size, family=_DenseFamily).eval()
    candidates: dict[str, Callable[[], object]] = {}

    def eager() -> object:
        with torch.inference_mode():
            return dense(x)

    candidates["eager"] = eager
    try:
        last = create_model(name, (1.0,), in_channels=channels, image_size=size, family=_DenseFamily).eval()
        last = last.to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)

        def channels_last() -> object:
            with torch.inference_mode():
                return last(x_last)

        channels_last()
        candidates["channels_last"] = channels_last
    except RuntimeError as e:
        warnings.warn(f"{name}: channels-last dense skipped: {e}", stacklevel=1)
    try:
        with torch.no_grad():
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(dense, x)))
        frozen(x)

        def onednn() -> object:
            with torch.no_grad():
                return frozen(x)

        candidates["onednn"] = onednn
    except RuntimeError as e:
        warnings.warn(f"{name}: TorchScript/oneDNN dense skipped: {e}", stacklevel=1)
    return candidates


def bench_model(threads: int, quick: bool) -> list[dict[str, Any]]:
    """Whole model at batch 1: the packed runtime per density (what ``packed(x)`` runs: the compiled native
    forward where there is one; and the per-layer path it replaced) vs the best of three dense torch paths."""
    torch.set_num_threads(threads)
    rows = []
    for name, channels, size in (("resnet20", 3, 32), ("cnn", 1, 28)):
        model = _trained_like(name, channels, size)
        packed = pack_checkpoint(model)
        x = torch.randn(1, channels, size, size)
        dense = _dense_model_candidates(name, channels, size, x)
        for density in MODEL_DENSITIES:
            packed.set_density(density)
            times = median_us({"packed": lambda: packed(x), "layers": lambda: packed.forward_layers(x), **dense},
                              1.0 if quick else 4.0, 5, 400)
            best = min(dense, key=times.__getitem__)
            rows.append({"model": name, "density": density, "packed_ms": round(times["packed"] / 1000, 4),
                         "packed_layers_ms": round(times["layers"] / 1000, 4),  # the per-layer Python path
                         "dense_ms": round(times[best] / 1000, 4), "dense_path": best,
                         "dense_paths_ms": {k: round(times[k] / 1000, 4) for k in dense}})  # fmt: skip
    return rows


def bench_switch_and_bytes(tmp: Path) -> dict[str, Any]:
    """Density switch vs loading a separately stored pruned model; bytes held per density and file bytes per
    stored maximum density, vs dense fp32."""
    model = _trained_like("resnet20", 3, 32)
    packed = pack_checkpoint(model)
    cycle = [d for d in MODEL_DENSITIES for _ in range(2)]
    switches = []
    for _ in range(200):
        for d in cycle:
            start = time.perf_counter()
            packed.set_density(d)
            switches.append(time.perf_counter() - start)
    reloads = []
    for d in MODEL_DENSITIES:
        path = pack_checkpoint(model, max_density=d).save(tmp / f"pruned-{d:g}.packed")
        for _ in range(5):
            start = time.perf_counter()
            PackedModel.load(path)
            reloads.append(time.perf_counter() - start)
    dense = 4 * model.subnet_params(1.0)
    return {
        "switch_us": round(statistics.median(switches) * 1e6, 2),
        "reload_ms": round(statistics.median(reloads) * 1e3, 2),
        "bytes": [{"density": d, "packed": packed.nbytes(d), "dense": dense} for d in MODEL_DENSITIES],
        # what is stored and sent: the packed file (float32, and float16 for transfer) vs dense fp32 weights
        "bytes_max_density": [
            {"max_density": d, "packed": len(stored.to_bytes()), "packed_fp16": len(stored.to_bytes(half=True)),
             "dense": dense}
            for d in MODEL_DENSITIES for stored in [pack_checkpoint(model, max_density=d)]
        ],
    }


def layers_table(rows: list[dict[str, Any]]) -> Table:
    """The `bench_layers` rows with speed-ups (>1 means packed is faster)."""
    table = Table(title="packed vs dense (best of F.* and oneDNN) vs torch.sparse CSR, median us")
    for col in ("op", "shape", "batch", "density", "packed", "dense best", "csr", "x dense", "x csr"):
        table.add_column(col, justify="left" if col in ("op", "shape") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["op"], r["shape"], str(r["batch"]), f"{r['density']:g}",
            f"{r['packed_us']:.1f}", f"{r['dense_best_us']:.1f}", f"{r['csr_us']:.1f}",
            f"{r['dense_best_us'] / r['packed_us']:.2f}", f"{r['csr_us'] / r['packed_us']:.2f}",
        )  # fmt: skip
    return table


def markdown(result: dict[str, Any]) -> str:
    """The committed table beside kernel.json: speed-ups are dense_best / packed (>1: packed faster)."""
    lines = [f"# Packed kernel — {result['machine']['cpu']}, {result['machine']['threads']} threads, "
             f"{result['machine'].get('kernel_isa', '')}", "", f"`{result['command']}`", "",
             "| op | shape | batch | density | packed us | dense best us | csr us | x dense | x csr |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["layers"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['batch']} | {r['density']:g} | {r['packed_us']:.1f} | "
                     f"{r['dense_best_us']:.1f} | {r['csr_us']:.1f} | {r['dense_best_us'] / r['packed_us']:.2f} | "
                     f"{r['csr_us'] / r['packed_us']:.2f} |")  # fmt: skip
    lines += ["", "Whole model: the dense side is the fastest of torch eager, channels-last and TorchScript frozen for "
              "inference (oneDNN-prepacked convolutions), each a plain dense torch model of the same shapes. "
              "Packed: what `packed(x)` runs (one native call per batch where the subnet compiles, "
              "dress_model/native_forward.py); per-layer: the Python layer-by-layer path.", "",
              "| model (batch 1) | density | packed ms | per-layer ms | dense ms (fastest path) | x dense |",
              "|---|---|---|---|---|---|"]
    for r in result["model"]:
        layers = f"{r['packed_layers_ms']:.3f}" if "packed_layers_ms" in r else "—"
        lines.append(f"| {r['model']} | {r['density']:g} | {r['packed_ms']:.3f} | {layers} | {r['dense_ms']:.3f} "
                     f"({r.get('dense_path', 'eager')}) | {r['dense_ms'] / r['packed_ms']:.2f} |")
    lines += ["", f"Density switch: {result['switch_us']} µs. Loading a separately stored pruned model: "
              f"{result['reload_ms']} ms.", "", "Packed file (a full top band's indices are not stored) vs the dense "
              "model's fp32 weights:", "",
              "| stored up to density | file bytes | ratio | fp16 file bytes | ratio | dense fp32 bytes |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for b in result["bytes_max_density"]:
        lines.append(f"| {b['max_density']:g} | {b['packed']:,} | {b['packed'] / b['dense']:.2f} | "
                     f"{b['packed_fp16']:,} | {b['packed_fp16'] / b['dense']:.2f} | {b['dense']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds per measurement (< 1 minute)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every candidate (default 2)")
    parser.add_argument("--json", type=Path, help="write the results here (atomically)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to measure, comma-separated from {', '.join(PARTS)}; the parts left out are "
                             "kept from --json (each part's machine is recorded with it)")
    args = parser.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if unknown := sorted(set(parts) - set(PARTS)) or not parts:
        parser.error(f"--parts: expected some of {', '.join(PARTS)}, got {args.parts!r} ({unknown or 'nothing'})")
    console = Console(width=max(Console().width, 110))  # the table is ~100 columns; do not fold it when piped
    load_before = os.getloadavg()
    kept: dict[str, Any] = {}
    if set(parts) != set(PARTS):
        if not (args.json and args.json.exists()):
            parser.error("--parts without every part keeps the others from --json, which must exist")
        kept = json.loads(args.json.read_text())
    layers = bench_layers(args.threads, args.quick, console) if "layers" in parts else kept["layers"]
    whole = bench_model(args.threads, args.quick) if "model" in parts else kept["model"]
    if "storage" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            storage = bench_switch_and_bytes(Path(tmp))
    else:
        storage = {k: kept[k] for k in ("switch_us", "reload_ms", "bytes", "bytes_max_density")}
    info = machine() | {"kernel_isa": kernel_isa(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    console.print(layers_table(layers))
    for r in whole:
        console.print(f"{r['model']} batch 1, d={r['density']:g}: packed {r['packed_ms']:.3f} ms, dense "
                      f"{r['dense_ms']:.3f} ms ({r['dense_ms'] / r['packed_ms']:.2f}x)")
    console.print(f"switch {storage['switch_us']} us; reload of a stored pruned model {storage['reload_ms']} ms")
    for b in storage["bytes"]:
        console.print(f"d={b['density']:g}: {b['packed']:,} bytes packed vs {b['dense']:,} dense ({b['packed'] / b['dense']:.2f}x)")
    console.print(f"threads={args.threads} kernel ISA={info['kernel_isa']} cpu={info['cpu']} "
                  f"load average before/after: {load_before[0]:.1f}/{info['loadavg_after'][0]:.1f}")  # fmt: skip
    if args.json:
        joined = f"{kept['command']} && {command()}" if kept else command()
        machines = {f"{part}_machine": info if part in parts else kept.get(f"{part}_machine", kept["machine"])
                    for part in PARTS}
        result = {"command": joined, "machine": info, **machines, "layers": layers, "model": whole, **storage}
        write_json(args.json, result)
        args.json.with_suffix(".md").write_text(markdown(result))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
