"""`dress-fleet`: the operator's command line (train, evaluate, and later the fleet commands)."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from coordinator.registry.cli import db_app, devices_app
from dress_model.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from dress_model.data import DATASETS, DataError, load_dataset
from dress_model.models import MODELS, create_model
from dress_model.packed import PackedFormatError, PackedModel, pack_checkpoint
from dress_model.sparsity import parse_densities
from dress_model.training import StepCallback, TrainConfig, evaluate, train

app = typer.Typer(
    help="dress-fleet: train and serve DRESS nested row-sparse subnets across fleets of edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(devices_app, name="devices")
app.add_typer(db_app, name="db")
console = Console()
err = Console(stderr=True)

BN_AFFINE = ("per-density", "shared")


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def parse_floats(spec: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in spec.split(",") if p.strip())
    except ValueError:
        raise fail(f"{what} must be comma-separated numbers, got {spec!r}") from None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


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


@app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option(help="Directory for model.safetensors and metrics.json.")],
    dataset: Annotated[str, typer.Option(help=f"One of {', '.join(DATASETS)}.")] = "fashion-mnist",
    model: Annotated[str, typer.Option(help=f"One of {', '.join(MODELS)}.")] = "cnn",
    densities: Annotated[str, typer.Option(help="Subnet densities trained jointly, e.g. 1,0.5,0.25,0.1.")] = "1,0.5,0.25,0.1",
    epochs: Annotated[float, typer.Option(min=0.01, help="Passes over the training set (fractions allowed).")] = 2.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (SGD, one-cycle schedule).")] = 0.05,
    loss_weights: Annotated[Optional[str], typer.Option(help="One weight per density, same order as --densities; default equal.")] = None,
    rerank_every: Annotated[int, typer.Option(min=0, help="Steps between re-rankings of each row's importance order; 0 = never.")] = 100,
    bn_affine: Annotated[str, typer.Option(help="BN scale/shift per density (switchable BN) or shared by all densities.")] = "per-density",
    recalibrate_batches: Annotated[int, typer.Option(min=0, help="Batches to recompute each density's BN statistics after training; 0 = off.")] = 50,
    width: Annotated[int, typer.Option(min=1, help="Base channel width of the model.")] = 16,
    train_subset: Annotated[int, typer.Option(min=0, help="Use only the first N training images (0 = all).")] = 0,
    data_dir: Annotated[Optional[Path], typer.Option(help="Directory holding the dataset files.")] = None,
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
    try:
        train_set = load_dataset(dataset, "train", data_dir, download)
        test_set = load_dataset(dataset, "test", data_dir, download)
    except DataError as e:
        raise fail(str(e)) from None
    if train_subset:
        train_set = train_set.subset(range(min(train_subset, len(train_set))))

    torch.manual_seed(seed)
    net = create_model(
        model,
        dens,
        in_channels=train_set.in_channels,
        num_classes=train_set.num_classes,
        image_size=train_set.images.shape[-1],
        width=width,
        bn_affine=bn_affine,
    )
    config = TrainConfig(
        loss_weights=weights,
        epochs=epochs,
        lr=lr,
        rerank_every=rerank_every,
        recalibrate_batches=recalibrate_batches,
    )
    console.print(
        f"Training [bold]{model}[/] on [bold]{dataset}[/] ({len(train_set):,} images), densities "
        f"{', '.join(f'{d:g}' for d in dens)}, {epochs:g} epochs, {torch.get_num_threads()} threads"
    )
    start = time.perf_counter()
    with progress_bar() as progress:
        train(net, train_set.loader(batch_size, shuffle=True, seed=seed), config, step_reporter(progress, "train"))
    train_s = time.perf_counter() - start
    accuracy = evaluate(net, test_set.loader(512, shuffle=False))
    rows = [(d, net.subnet_params(d), accuracy[d]) for d in dens]

    meta = {"dataset": dataset, "epochs": epochs, "seed": seed, "bn_affine": bn_affine, "train_seconds": round(train_s, 1)}
    checkpoint = save_checkpoint(net, out / "model.safetensors", meta)
    metrics = {
        **meta,
        "model": model,
        "checkpoint": str(checkpoint),
        "densities": [{"density": d, "params": p, "accuracy": a} for d, p, a in rows],
    }
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    console.print(accuracy_table(f"{model} on {dataset} test set ({train_s:.0f} s training)", rows[::-1]))
    console.print(f"Saved {checkpoint} and {out / 'metrics.json'}")


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A model.safetensors written by `dress-fleet train`.")],
    dataset: Annotated[Optional[str], typer.Option(help="Override the dataset recorded in the checkpoint.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option()] = None,
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


@app.command("pack")
def pack_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A model.safetensors written by `dress-fleet train`.")],
    out: Annotated[Path, typer.Argument(help="Where to write the packed model.")],
    max_density: Annotated[Optional[float], typer.Option(help="Store only the subnets up to this density.")] = None,
) -> None:
    """Write the packed row-sparse form that devices store, download and execute."""
    try:
        net, _ = load_checkpoint(checkpoint)
        packed = pack_checkpoint(net, max_density)
    except (CheckpointError, ValueError) as e:
        raise fail(str(e)) from None
    packed.save(out)
    table = Table(title=f"{out}")
    for column in ("density", "bytes", "vs dense fp32"):
        table.add_column(column, justify="right")
    dense = 4 * net.subnet_params(net.densities[-1])
    for d in packed.densities[::-1]:
        table.add_row(f"{d:g}", f"{packed.nbytes(d):,}", f"{packed.nbytes(d) / dense:.2f}x")
    console.print(table)


@app.command("infer")
def infer_cmd(
    packed_path: Annotated[Path, typer.Argument(metavar="PACKED", help="A packed model from `dress-fleet pack`.")],
    density: Annotated[Optional[float], typer.Option(help="Subnet to run; default the densest stored.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Test images to classify.")] = 8,
    dataset: Annotated[str, typer.Option(help="Dataset whose test split provides the batch.")] = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option()] = None,
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


coordinator_app = typer.Typer(help="Run the fleet coordinator: registry, control plane, Flower SuperLink, DRESS run.")
app.add_typer(coordinator_app, name="coordinator")


@coordinator_app.command("start")
def coordinator_start_cmd(
    host: Annotated[str, typer.Option(help="Address the SuperLink and control plane listen on.")] = "127.0.0.1",
    superlink_port: Annotated[int, typer.Option(help="Flower SuperLink (HTTP: fleet, control and runtime APIs).")] = 9092,
    control_port: Annotated[int, typer.Option(help="DRESS control plane (gRPC: register, heartbeat, fetch model).")] = 9093,
    db: Annotated[Optional[str], typer.Option(help="Registry SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default SQLite in --state-dir.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Registry, checkpoints, Flower state and logs.")] = Path("state"),
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    min_devices: Annotated[int, typer.Option(min=1, help="Devices that must join before round 1.")] = 2,
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of online devices trained per round.")] = 0.5,
    densities: Annotated[str, typer.Option()] = "1,0.5,0.25,0.1",
    model: Annotated[str, typer.Option()] = "cnn",
    width: Annotated[int, typer.Option(min=1)] = 16,
    dataset: Annotated[str, typer.Option()] = "fashion-mnist",
    partition: Annotated[str, typer.Option(help="iid or dirichlet:ALPHA.")] = "iid",
    epochs: Annotated[float, typer.Option(min=0.01)] = 1.0,
    max_examples: Annotated[int, typer.Option(min=0, help="Cap on a device's examples per round (0 = its whole shard).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Start the SuperLink and control plane, wait for devices, and run federated DRESS; Ctrl-C stops everything."""
    from coordinator.launcher import Coordinator, Endpoints

    try:
        parse_densities(densities)
        create_model(model, densities)
        from dress_model.partition import parse_partition

        parse_partition(partition)
    except ValueError as e:
        raise fail(str(e)) from None
    run_config = {
        "num-rounds": rounds, "wait-for-nodes": min_devices, "min-devices": 1, "fraction": fraction,
        "densities": densities, "model": model, "width": width, "dataset": dataset, "partition": partition,
        "epochs": epochs, "max-examples": max_examples, "seed": seed, "db-url": db or "",
    }  # fmt: skip
    coordinator = Coordinator(state_dir, run_config, Endpoints(host, superlink_port, control_port))
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop gets the same orderly shutdown as Ctrl-C
    try:
        coordinator.start()
        console.print(f"[bold]SuperLink[/]      {coordinator.endpoints.superlink}  (agents: --superlink)")
        console.print(f"[bold]Control plane[/]  {coordinator.endpoints.control_plane}  (agents: --coordinator)")
        console.print(f"[bold]Registry[/]       {coordinator.registry.safe_url if coordinator.registry else ''}")
        console.print(f"[bold]State[/]          {state_dir}  (logs in {state_dir / 'logs'})")
        run_id = coordinator.submit()
        console.print(f"Run {run_id} submitted: waiting for {min_devices} device(s), then {rounds} rounds. Ctrl-C stops.")

        def on_round(entry: dict) -> None:
            acc = ", ".join(f"{float(d):g}: {a:.1f}%" for d, a in sorted(entry["accuracy"].items(), key=lambda kv: -float(kv[0])))
            console.print(f"round {entry['round']}: {len(entry['participants'])} devices trained; accuracy {acc}")

        coordinator.follow(run_id, on_round)
        console.print("Run finished; the control plane keeps serving the fleet. Ctrl-C stops.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("Stopping…")
    except (RuntimeError, TimeoutError, DataError, OSError) as e:
        raise fail(str(e)) from None
    finally:
        coordinator.stop()


@app.command("simulate")
def simulate_cmd(
    devices: Annotated[int, typer.Option(min=1, help="Virtual devices (Flower virtual SuperNodes).")] = 100,
    rounds: Annotated[int, typer.Option(min=1)] = 5,
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of online devices trained per round.")] = 0.1,
    mix: Annotated[str, typer.Option(help="Device mix, PROFILE=PERCENT pairs summing to 100.")] = "pi4=40,jetson-nano=30,phone=30",
    partition: Annotated[str, typer.Option(help="iid or dirichlet:ALPHA (non-IID by label).")] = "iid",
    dataset: Annotated[str, typer.Option()] = "fashion-mnist",
    model: Annotated[str, typer.Option()] = "cnn",
    width: Annotated[int, typer.Option(min=1)] = 16,
    densities: Annotated[str, typer.Option()] = "1,0.5,0.25,0.1",
    epochs: Annotated[float, typer.Option(min=0.01, help="Local epochs per round on a device's shard.")] = 1.0,
    lr: Annotated[float, typer.Option(min=0.0)] = 0.05,
    max_examples: Annotated[int, typer.Option(min=0, help="Cap on a device's examples per round (0 = its whole shard).")] = 0,
    dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of devices that drop out for a while.")] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    db: Annotated[Optional[str], typer.Option(help="Registry SQLAlchemy URL; default SQLite in the run directory.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory for report.md, metrics.json and plots.")] = Path("runs/simulation"),
    superlink_port: Annotated[int, typer.Option()] = 9392,
    control_port: Annotated[int, typer.Option()] = 9393,
) -> None:
    """Simulate a fleet of heterogeneous devices on Flower's simulation engine (Ray), deployment code throughout."""
    from simulations.run import SimulationSettings, run_simulation

    settings = SimulationSettings(
        devices=devices, rounds=rounds, fraction=fraction, mix=mix, partition=partition, dataset=dataset,
        model=model, width=width, densities=densities, epochs=epochs, lr=lr, max_examples=max_examples,
        dropout=dropout, seed=seed, db_url=db or "", run_dir=out, superlink_port=superlink_port,
        control_port=control_port,
    )  # fmt: skip
    try:
        settings.validate()
    except ValueError as e:
        raise fail(str(e)) from None
    console.print(f"Simulating {devices} devices ({mix}), {rounds} rounds, {fraction:g} of the fleet per round")
    with progress_bar() as progress:
        task = progress.add_task("rounds", total=rounds, info="starting the fleet, SuperLink and Ray")

        def on_round(entry: dict) -> None:
            acc = " ".join(f"{float(d):g}:{a:.1f}%" for d, a in sorted(entry["accuracy"].items(), key=lambda kv: -float(kv[0])))
            progress.update(task, completed=entry["round"], info=f"{len(entry['participants'])} devices, acc {acc}")

        try:
            metrics = run_simulation(settings, on_round)
        except (RuntimeError, TimeoutError, DataError) as e:
            raise fail(str(e)) from None
    rows = [(row["density"], 0, row["accuracy"]) for row in metrics["accuracy"]]
    table = Table(title=f"Final accuracy after {metrics['rounds']} rounds ({metrics['wall_s']:.0f} s, peak {metrics['peak_rss_mb']:.0f} MB)")
    for column in ("density", "accuracy %", "bytes down", "bytes up"):
        table.add_column(column, justify="right")
    traffic = {row["density"]: row for row in metrics["bytes"]}
    for d, _, acc in rows:
        t = traffic.get(d, {"down": 0, "up": 0})
        table.add_row(f"{d:g}", f"{acc:.2f}", f"{t['down']:,.0f}", f"{t['up']:,.0f}")
    console.print(table)
    console.print(f"Report: {out / 'report.md'}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()
