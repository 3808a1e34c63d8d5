"""The method on one machine: `dress-fleet train`, `evaluate`, `pack`, `infer`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.progress import Progress
from rich.table import Table

from cli.common import console, fail, progress_bar
from contracts.settings import DATASET_HELP, MODEL_HELP
from dress_model.checkpoint import CheckpointError, load_checkpoint
from dress_model.data import DataError, load_dataset
from dress_model.experiment import Experiment, run_experiment
from dress_model.models import MODELS
from dress_model.packed import PackedModel, pack_checkpoint
from dress_model.packed_format import PackedFormatError
from dress_model.sparsity import DEFAULT_DENSITIES, format_densities, parse_densities
from dress_model.training import StepCallback, TrainConfig, evaluate

BN_AFFINE = ("per-density", "shared")
DATA_DIR_HELP = "Directory holding the dataset files (default: where the dataset's package puts them)."


def parse_floats(spec: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in spec.split(",") if p.strip())
    except ValueError:
        raise fail(f"{what} must be comma-separated numbers, got {spec!r}") from None


def step_reporter(progress: Progress, description: str) -> StepCallback:
    task = progress.add_task(description, total=None, info="")

    def on_step(step: int, total: int, losses: dict[float, float]) -> None:
        info = " ".join(f"{d:g}:{loss:.3f}" for d, loss in sorted(losses.items(), reverse=True))
        progress.update(task, completed=step, total=total, info=f"loss {info}")

    return on_step


def accuracy_table(title: str, rows: list[tuple[float, int, float]]) -> Table:
    table = Table(title=title)
    table.add_column("density", justify="right")
    table.add_column("params", justify="right")
    table.add_column("accuracy %", justify="right")
    for d, params, acc in rows:
        table.add_row(f"{d:g}", f"{params:,}", f"{acc:.2f}")
    return table


def train_cmd(
    out: Annotated[Path, typer.Option(help="Directory for model.safetensors and metrics.json.")],
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "fashion-mnist",
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "cnn",
    densities: Annotated[str, typer.Option(help="Subnet densities trained jointly, densest first.")]
    = format_densities(DEFAULT_DENSITIES),
    epochs: Annotated[float, typer.Option(min=0.01, help="Passes over the training set (fractions allowed).")] = 2.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (SGD, one-cycle schedule).")] = 0.05,
    loss_weights: Annotated[Optional[str], typer.Option(help="One weight per density, same order as --densities; default equal.")] = None,
    rerank_every: Annotated[int, typer.Option(min=0, help="Steps between re-rankings of each row's importance order; 0 = never.")] = 100,
    bn_affine: Annotated[str, typer.Option(help="BN scale/shift per density (switchable BN) or shared by all densities.")] = "per-density",
    recalibrate_batches: Annotated[int, typer.Option(min=0, help="Batches to recompute each density's BN statistics after training; 0 = off.")] = 50,
    width: Annotated[int, typer.Option(min=1, help="Base channel width of the model.")] = 16,
    train_subset: Annotated[int, typer.Option(min=0, help="Use only the first N training images (0 = all).")] = 0,
    data_dir: Annotated[Optional[Path], typer.Option(help=DATA_DIR_HELP)] = None,
    download: Annotated[bool, typer.Option(help="Download the dataset if it is missing (needs internet).")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train one DRESS backbone whose nested subnets all share its weights, then evaluate every density."""
    try:
        dens = parse_densities(densities)
    except ValueError as e:
        raise fail(str(e)) from None
    weights = parse_floats(loss_weights, "--loss-weights") if loss_weights else None
    if weights is not None:
        if len(weights) != len(dens):
            raise fail(f"--loss-weights needs {len(dens)} values (one per density), got {len(weights)}")
        given = [float(p) for p in densities.split(",") if p.strip()]
        weights = tuple(w for _, w in sorted(zip(given, weights)))  # align with ascending densities
    if model not in MODELS:
        raise fail(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    if bn_affine not in BN_AFFINE:
        raise fail(f"unknown --bn-affine {bn_affine!r}; expected one of {', '.join(BN_AFFINE)}")
    config = TrainConfig(loss_weights=weights, epochs=epochs, lr=lr, rerank_every=rerank_every,
                         recalibrate_batches=recalibrate_batches)
    exp = Experiment(dataset=dataset, model=model, densities=dens, config=config, batch_size=batch_size,
                     width=width, bn_affine=bn_affine, train_subset=train_subset, data_dir=data_dir,  # type: ignore[arg-type]
                     download=download, seed=seed)
    console.print(f"Training [bold]{model}[/] on [bold]{dataset}[/], densities {format_densities(dens)}, "
                  f"{epochs:g} epochs, {torch.get_num_threads()} threads")
    try:
        with progress_bar() as progress:
            outcome = run_experiment(exp, out, step_reporter(progress, "train"))
    except (DataError, ValueError) as e:
        raise fail(str(e)) from None
    console.print(accuracy_table(f"{model} on {dataset} test set ({outcome.images:,} training images, "
                                 f"{outcome.train_s:.0f} s training)", outcome.rows[::-1]))
    console.print(f"Saved {outcome.checkpoint} and {outcome.metrics}")


def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A model.safetensors written by `dress-fleet train`.")],
    dataset: Annotated[Optional[str], typer.Option(help="Override the dataset recorded in the checkpoint. " + DATASET_HELP)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help=DATA_DIR_HELP)] = None,
) -> None:
    """Print the test accuracy of every subnet stored in a checkpoint."""
    try:
        net, header = load_checkpoint(checkpoint)
        name = dataset or header["meta"].get("dataset", "fashion-mnist")
        test_set = load_dataset(name, "test", data_dir)
    except (CheckpointError, DataError) as e:
        raise fail(str(e)) from None
    accuracy = evaluate(net, test_set.loader(512, shuffle=False))
    rows = [(d, net.subnet_params(d), accuracy[d]) for d in net.densities]
    console.print(accuracy_table(f"{checkpoint} on {name} test set", rows[::-1]))


def pack_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A model.safetensors written by `dress-fleet train`.")],
    out: Annotated[Path, typer.Argument(help="Where to write the packed model.")],
    max_density: Annotated[Optional[float], typer.Option(help="Store only the subnets up to this density.")] = None,
    half: Annotated[bool, typer.Option("--half", help="Store the weights as float16: about 40% fewer bytes to "
                                       "send and store; computed in float32 after loading "
                                       "(benchmarks/results/half.md gives the accuracy change).")] = False,
) -> None:
    """Write the packed row-sparse form that devices store, download and execute."""
    try:
        net, _ = load_checkpoint(checkpoint)
        packed = pack_checkpoint(net, max_density)
        packed.save(out, half)
    except (CheckpointError, ValueError) as e:
        raise fail(str(e)) from None
    table = Table(title=f"{out}: {out.stat().st_size:,} bytes{' (float16)' if half else ''}; held in memory per subnet:")
    for column in ("density", "bytes", "vs dense fp32"):
        table.add_column(column, justify="right")
    dense = 4 * net.subnet_params(net.densities[-1])
    for d in packed.densities[::-1]:
        table.add_row(f"{d:g}", f"{packed.nbytes(d):,}", f"{packed.nbytes(d) / dense:.2f}x")
    console.print(table)


def infer_cmd(
    packed_path: Annotated[Path, typer.Argument(metavar="PACKED", help="A packed model from `dress-fleet pack`.")],
    density: Annotated[Optional[float], typer.Option(help="Subnet to run; default the densest stored.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Test images to classify.")] = 8,
    dataset: Annotated[str, typer.Option(help="Dataset whose test split provides the batch. " + DATASET_HELP)] = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option(help=DATA_DIR_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Kernel threads (default: torch's).")] = None,
) -> None:
    """Run one batch through the packed kernel at a density and report predictions and latency."""
    try:
        packed = PackedModel.load(packed_path)
        packed.set_density(packed.densities[-1] if density is None else density)
        test_set = load_dataset(dataset, "test", data_dir)
    except (PackedFormatError, DataError, ValueError) as e:
        raise fail(str(e)) from None
    if threads:
        torch.set_num_threads(threads)
    x, y = test_set.images[:batch].contiguous(), test_set.labels[:batch]
    packed(x)  # warm-up
    start = time.perf_counter()
    logits = packed(x)
    ms = 1000 * (time.perf_counter() - start)
    predicted = logits.argmax(1)
    console.print(
        f"density {packed.active_density:g}: {ms:.2f} ms for {batch} images; "
        f"{int((predicted == y).sum())}/{batch} correct; predictions {predicted.tolist()}"
    )


def add_commands(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("pack")(pack_cmd)
    app.command("infer")(infer_cmd)
