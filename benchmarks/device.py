"""On the device: what training its subnet costs, and how well each density policy meets deadlines.

    python -m benchmarks.device --json benchmarks/results/device.json
    python -m benchmarks.device --quick                       # fewer rounds and samples
    python -m benchmarks.device --parts adaptation --model runs/demo/state/checkpoints/round-40.safetensors \
        --json benchmarks/results/device.json                 # re-measure one part, keep the other
    python -m benchmarks.device --parts adaptation --replay benchmarks/results/device.json --json /tmp/device.json
                                                              # today's policies on the kept latency samples

``adaptation`` rows (see benchmarks/adaptation.py): per budget trace and policy, the share of requests that
missed their deadline, the accuracy of the subnets that answered, and the 99th percentile response time. The
model is ``--model`` (a DRESS checkpoint or packed file; by default a ``--train-model`` trained here for
``--train-epochs`` on Fashion-MNIST), and the deadline is ``--deadline-factor`` times its full model's median idle latency.

``training`` rows, per model (the fleet's cnn on 1x28x28, resnet20 on 3x32x32) and density: one step at batch
32 (forward, backward, Nesterov SGD) of the subnet at that density, as the ClientApp runs it (a PackedModel
packed up to the density, trained in place) and as devices trained before (the same subnet as a dense model
under its mask, ``PackedModel.to_dress``). Times are medians over rounds that alternate the two paths in one
process (``step_ms`` / ``dense_step_ms``). ``state_mb``: the bytes training holds for the model — parameters,
their gradients, the optimizer's state, buffers (indices, or the dense path's row order), cached masks, and a
full top band's gather index (packed d=1 trains densely on the values gathered into place).
``peak_mb``: the peak resident memory during three steps above the idle process that holds the model
(activations included), each measured in a fresh process. ``sparse_ms``: the part of ``step_ms`` spent in
the packed layers' kernels, forward and backward (their share of the step's operator time under the
profiler): the rest (BN, ReLU, pooling, the loss and the optimizer, all over dense activations) costs about
the same on both paths, so ``dense_step_ms / (step_ms - sparse_ms)`` bounds what any faster kernel could reach.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress, track  # noqa: E402

from benchmarks import adaptation  # noqa: E402
from benchmarks.common import command, machine, markdown_table, median_us, peak_rss_above_idle, write_json  # noqa: E402
from dress_model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from dress_model.data import load_dataset  # noqa: E402
from dress_model.kernels import kernel_isa  # noqa: E402
from dress_model.layers import RowSparse  # noqa: E402
from dress_model.models import MODELS as MODEL_NAMES  # noqa: E402
from dress_model.models import create_model  # noqa: E402
from dress_model.packed import PackedModel, pack_checkpoint  # noqa: E402
from dress_model.packed_format import PackedFormatError  # noqa: E402
from dress_model.packed_layer import PackedSparse  # noqa: E402
from dress_model.training import Trainable, TrainConfig, joint_step, make_optimizer, train  # noqa: E402

MODELS = {"cnn": (1, 28), "resnet20": (3, 32)}  # name -> (channels, image size)
DENSITIES = (1.0, 0.5, 0.25, 0.1)
BATCH = 32
PATHS = ("packed", "dense")


def _subnet(name: str, density: float, path: str) -> Trainable:
    """The subnet at ``density`` of a model with magnitude-ranked random weights, as ``path`` trains it."""
    channels, size = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, (0.1, 0.25, 0.5, 1.0), in_channels=channels, image_size=size)
    model.rerank()
    packed = PackedModel.from_dress(copy.deepcopy(model).eval(), max_density=density)
    return packed if path == "packed" else packed.to_dress()


def _stepper(model: Trainable, density: float) -> tuple[Any, torch.optim.Optimizer]:
    channels, size = model.arch.in_channels, model.arch.image_size
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, channels, size, size, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    optimizer, _ = make_optimizer(model, TrainConfig(densities=(density,)), total_steps=1_000_000)
    return lambda: joint_step(model, x, y, (density,), (1.0,), optimizer), optimizer


def state_bytes(model: Trainable, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor training keeps for the model, each storage counted once."""
    tensors: list[torch.Tensor] = []
    for p in model.parameters():
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
    for state in optimizer.state.values():
        tensors.extend(t for t in state.values() if isinstance(t, torch.Tensor))
    tensors.extend(model.buffers())
    tensors.extend(m for layer in model.modules() if isinstance(layer, RowSparse) for m in layer.cached_masks())
    tensors.extend(layer.placement for layer in model.modules()  # a full top band's gather index
                   if isinstance(layer, PackedSparse) and layer.placement is not None)
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def peak_above_idle(name: str, density: float, path: str, steps: int = 3) -> float:
    """MB of resident memory above the idle process during ``steps`` training steps (run in this process)."""
    model = _subnet(name, density, path)
    step, _ = _stepper(model, density)
    with peak_rss_above_idle() as extra_mb:
        for _ in range(steps):
            step()
    return extra_mb[0]


def _peak_in_fresh_process(name: str, density: float, path: str, threads: int) -> float:
    """A new interpreter per measurement: freed memory kept by the allocator would hide the next peak."""
    out = subprocess.run([sys.executable, __file__, "--peak-of", name, str(density), path, "--threads", str(threads)],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


SPARSE_OPS = ("_PackedConv2d", "_PackedConv2dBackward", "_PackedLinear", "_PackedLinearBackward")


def sparse_share(step: Any, steps: int = 5) -> float:
    """The share of a packed step's operator time spent in the packed layers' kernels (autograd functions)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in SPARSE_OPS) / max(total, 1e-9)


def bench_training(threads: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    cases = [(name, d) for name in MODELS for d in DENSITIES]
    for name, density in track(cases, description="training steps"):
        models = {path: _subnet(name, density, path) for path in PATHS}
        steppers = {path: _stepper(models[path], density) for path in PATHS}
        times = median_us({path: steppers[path][0] for path in PATHS}, 3.0 if quick else 15.0, 3, 200, block=2)
        state = {path: state_bytes(models[path], steppers[path][1]) / 2**20 for path in PATHS}
        peak = {path: _peak_in_fresh_process(name, density, path, threads) for path in PATHS}
        share = sparse_share(steppers["packed"][0])
        rows.append({"model": name, "density": density, "step_ms": round(times["packed"] / 1e3, 2),
                     "dense_step_ms": round(times["dense"] / 1e3, 2),
                     "sparse_ms": round(share * times["packed"] / 1e3, 2), "state_mb": round(state["packed"], 3),
                     "dense_state_mb": round(state["dense"], 3), "peak_mb": round(peak["packed"], 1),
                     "dense_peak_mb": round(peak["dense"], 1)})
    return rows


def served_model(path: Path | None, name: str, epochs: float, console: Console) -> PackedModel:
    """The model whose subnets answer the requests: a DRESS checkpoint or packed file, else one trained here."""
    if path is not None:
        try:
            return PackedModel.load(path)
        except PackedFormatError:
            try:
                return pack_checkpoint(load_checkpoint(path)[0])
            except CheckpointError as e:
                raise SystemExit(f"--model {path}: neither a packed model nor a DRESS checkpoint ({e})") from None
    torch.manual_seed(0)
    model = create_model(name, (0.1, 0.25, 0.5, 1.0))
    loader = load_dataset("fashion-mnist", "train").loader(64, shuffle=True)
    with Progress(console=console) as progress:
        task = progress.add_task(f"training a {name} on Fashion-MNIST to serve (--model skips this)",
                                 total=max(1, round(epochs * len(loader))))
        train(model, loader, TrainConfig(epochs=epochs), on_step=lambda step, *_: progress.update(task, completed=step))
    return pack_checkpoint(model)


def measure_adaptation(packed: PackedModel, samples: int, threads: int, console: Console) -> adaptation.Measured:
    test = load_dataset("fashion-mnist" if packed.arch.in_channels == 1 else "cifar10", "test")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # as the agent serves
    try:
        with console.status("measuring") as status:
            return adaptation.measure(packed, test, samples, lambda what: status.update(f"measuring {what}"))
    finally:
        torch.set_num_threads(before)


def saved_measurement(path: Path) -> tuple[adaptation.Measured, int]:
    """The latency samples (and serving threads) an earlier run of this benchmark kept in its JSON."""
    try:
        saved = json.loads(path.read_text())["adaptation"]
        return adaptation.Measured.from_json(saved["samples"]), int(saved["serve_threads"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--replay {path}: expected a device.json whose adaptation kept its samples "
                         f"(written by this benchmark since they are kept), got {type(e).__name__}: {e}") from None


def adaptation_result(measured: adaptation.Measured, deadline_factor: float, seed: int, threads: int) -> dict[str, Any]:
    deadline = deadline_factor * measured.median_ms(0, max(measured.densities))
    rows = adaptation.run(measured, deadline, seed)
    return {"deadline_ms": round(deadline, 3), "serve_threads": threads, "trace_s": adaptation.TRACE_S, "interval_ms": adaptation.INTERVAL_MS,
            "latency_ms": {str(load): {f"{d:g}": round(measured.median_ms(load, d), 3) for d in measured.densities}
                           for load in adaptation.LOADS},
            "reload_ms": {str(load): {f"{d:g}": round(ms, 2) for d, ms in r.items()}
                          for load, r in measured.reload_ms.items()},
            "subnet_accuracy": {f"{d:g}": round(100.0 * float(c.mean()), 2) for d, c in measured.correct.items()},
            "rows": rows,
            "samples": measured.to_json()}  # what the rows were replayed from: `--replay` judges another policy on it


def markdown(result: dict[str, Any]) -> str:
    text = (f"# On the device\n\n`{result['command']}`\n\n{result['machine']['cpu']}, "
            f"{result['machine']['threads']} threads, kernel ISA {result['machine']['kernel_isa']}.\n\n")
    if "training" in result:
        rows = [r | {"speedup": round(r["dense_step_ms"] / r["step_ms"], 2),
                     "bound": round(r["dense_step_ms"] / (r["step_ms"] - r["sparse_ms"]), 2) if "sparse_ms" in r else "",
                     "state ratio": round(r["state_mb"] / r["dense_state_mb"], 2)} for r in result["training"]]
        columns = ["model", "density", "step_ms", "dense_step_ms", "speedup", "sparse_ms", "bound", "state_mb",
                   "dense_state_mb", "state ratio", "peak_mb", "dense_peak_mb"]
        text += (f"## Training through the packed format\n\nOne training step at batch {BATCH} of the subnet at each "
                 f"density: packed (what the ClientApp runs) vs the same subnet as a dense model under its mask, "
                 f"alternated in one process (medians). sparse_ms: the packed step's time in the packed layers' "
                 f"kernels (forward and backward); bound: the speedup if those took no time at all, the rest of the "
                 f"step (BN, ReLU, pooling, optimizer, over dense activations) being about the same on both paths. "
                 f"State: parameters, gradients, optimizer state, buffers and masks. Peak: resident memory above the idle process during three steps, in a fresh process "
                 f"each.\n\n" + markdown_table(rows, columns) + "\n")
    if "adaptation" in result:
        a = result["adaptation"]
        text += (f"## Density per request under a changing budget\n\nDeadline {a['deadline_ms']} ms, "
                 f"{a.get('serve_threads', 1)} serving thread(s), one request every "
                 f"{a['interval_ms']:g} ms for {a['trace_s']:g} s per trace (see benchmarks/adaptation.py). Subnet "
                 f"accuracy on the test images: {a['subnet_accuracy']}. Median batch-1 latency (ms) per number of "
                 f"busy background processes: {a['latency_ms']}; loading a stored pruned model: {a['reload_ms']} "
                 f"ms.\n\n" + markdown_table(a["rows"], ["trace", "policy", "miss_rate", "accuracy", "p99_ms"]))
    return text


PARTS = ("training", "adaptation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and latency samples")
    parser.add_argument("--threads", type=int, default=2, help="torch and kernel threads (default 2)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)}; the others are kept from --json")
    parser.add_argument("--model", type=Path, help="adaptation: the served model (checkpoint or packed file)")
    parser.add_argument("--train-model", default="resnet20", help="adaptation without --model: what to train "
                        "(default resnet20: at batch 1 its subnets' latencies differ enough to matter)")
    parser.add_argument("--train-epochs", type=float, default=0.25, help="adaptation without --model (default 0.25)")
    parser.add_argument("--deadline-factor", type=float, default=2.0,
                        help="adaptation: the deadline as a multiple of the full model's idle latency (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="adaptation: traces and latency draws (default 0)")
    parser.add_argument("--serve-threads", type=int, default=1, help="adaptation: threads a forward pass runs on "
                        "(default 1, as `dress-agent join` serves: latency stays steady when other work shares "
                        "the cores)")
    parser.add_argument("--replay", type=Path, metavar="JSON", help="adaptation: replay the latency samples a "
                        "device.json written by this benchmark kept, with today's policies, instead of measuring "
                        "(judges a change to the agent's latency model on the same measurement)")
    parser.add_argument("--json", type=Path, help="write the results here (atomically), and a .md beside it")
    parser.add_argument("--peak-of", nargs=3, metavar=("MODEL", "DENSITY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if args.threads < 1 or args.serve_threads < 1:
        parser.error(f"--threads and --serve-threads must be >= 1, got {args.threads} and {args.serve_threads}")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts must name some of {', '.join(PARTS)}, got {args.parts!r}")
    if args.train_model not in MODEL_NAMES:
        parser.error(f"--train-model must be one of {', '.join(sorted(MODEL_NAMES))}, got {args.train_model!r}")
    if args.deadline_factor <= 0 or args.train_epochs <= 0:
        parser.error("--deadline-factor and --train-epochs must be > 0")
    torch.set_num_threads(args.threads)
    if args.peak_of:
        name, density, path = args.peak_of
        print(json.dumps({"peak_mb": peak_above_idle(name, float(density), path)}))
        return
    console = Console()
    kept = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    result: dict[str, Any] = {k: kept[k] for k in PARTS if k in kept and k not in parts}
    load_before = os.getloadavg()
    if "training" in parts:
        result["training"] = bench_training(args.threads, args.quick)
        for r in result["training"]:
            console.print(f"{r['model']} d={r['density']:g}: step {r['step_ms']} ms packed vs {r['dense_step_ms']} ms "
                          f"dense masked ({r['dense_step_ms'] / r['step_ms']:.2f}x); state {r['state_mb']:.2f} vs "
                          f"{r['dense_state_mb']:.2f} MB; peak {r['peak_mb']} vs {r['dense_peak_mb']} MB")
    if "adaptation" in parts:
        if args.replay:
            measured, serve_threads = saved_measurement(args.replay)
        else:
            packed = served_model(args.model, args.train_model, args.train_epochs, console)
            serve_threads = args.serve_threads
            measured = measure_adaptation(packed, 60 if args.quick else 300, serve_threads, console)
        result["adaptation"] = adaptation_result(measured, args.deadline_factor, args.seed, serve_threads)
        for r in result["adaptation"]["rows"]:
            console.print(f"{r['trace']:>13} {r['policy']:>15}: {r['miss_rate']:5.2f}% late, accuracy "
                          f"{r['accuracy']:.2f}%, p99 {r['p99_ms']} ms")
    info = machine() | {"kernel_isa": kernel_isa(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if args.json:
        previous = kept.get("command", "")
        joined = command() if not previous or set(parts) == set(PARTS) else f"{previous} && {command()}"
        result = {"command": joined, "machine": info, **result}
        write_json(args.json, result)
        args.json.with_suffix(".md").write_text(markdown(result))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
