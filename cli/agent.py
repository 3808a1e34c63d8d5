"""`dress-agent`: run a device of the fleet (`join`), and ask a running one for an answer (`predict`, `status`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import grpc
import typer
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from agent.budget import BudgetSource, MachineBudget, TraceBudget
from agent.calibration import DEFAULT_REPEATS, DEFAULT_TRAIN_REPEATS
from agent.lifecycle import DEFAULT_SERVE_PORT, DEFAULT_SUPERNODE_PORT, Agent, AgentConfig, AgentError
from agent.metrics import DEFAULT_METRICS_PORT
from agent.version_check import CHECK_SET_FORM, DEFAULT_CHECK_EXAMPLES, parse_check_set
from cli.common import console, err, fail, safe_text, version_option
from cli.method import DATA_DIR_HELP
from contracts.naming import check_name
from contracts.policy import CalibrationPoint
from contracts.profiles import Profile, UnknownProfileError, get_profile, load_profiles
from contracts.settings import DATASET_HELP
from dress_model.data import DataError, load_dataset
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from runtime.certificates import CertificateError, client_credentials

T = TypeVar("T")

app = typer.Typer(
    help="dress-agent: an edge device of a DRESS fleet. `join` learns the fleet's model from the coordinator, "
    "calibrates this machine, registers, trains with the federation through a Flower SuperNode and serves "
    "inference at the density its current budget affords; `predict` and `status` ask a running agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(version: bool = version_option("dress-agent")) -> None:
    """dress-agent: an edge device of a DRESS fleet."""


def parse_address(value: str, option: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(f"{option} must be HOST:PORT, got {value!r}")
    return value


def budget_source(profile: Profile, trace: Path | None) -> BudgetSource:
    return MachineBudget(profile) if trace is None else TraceBudget.from_file(trace)


def calibration_table(points: list[CalibrationPoint]) -> Table:
    table = Table(title="calibration on this machine")
    for column in ("density", "latency ms (median, batch 1)", "memory MB", "training step ms (batch 32)",
                   "training MB"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(f"{p.density:g}", f"{p.latency_ms:.3f}", f"{p.memory_mb:.2f}", f"{p.train_ms:.1f}",
                      f"{p.train_memory_mb:.1f}")
    return table


@contextlib.contextmanager
def shutdown_requested() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM, so shutdown runs in order instead of unwinding from a signal."""
    event = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: event.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command("join")
def join_cmd(
    device: Annotated[str, typer.Option(help=f"Device profile: one of {', '.join(load_profiles())}.")],
    coordinator: Annotated[str, typer.Option(help="Coordinator control plane, HOST:PORT.")],
    superlink: Annotated[str, typer.Option(help="Flower SuperLink Fleet API, HOST:PORT.")],
    token: Annotated[Optional[str], typer.Option(
        envvar="DRESS_ENROLLMENT_TOKEN",
        help="One-time enrollment token from `dress-fleet devices enroll NAME` on the coordinator, for the first "
             "join (or to re-enroll); later joins use the credential it bought, stored in --state-dir.")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="The device's name (default: the one it was enrolled under).")] = None,
    budget_trace: Annotated[Optional[Path], typer.Option(
        help="Replay budgets from a CSV (t_s,latency_ms,memory_mb[,battery]) or JSON trace instead of "
        "reading this machine's load and memory.")] = None,
    serve_host: Annotated[str, typer.Option(help="Interface Predict listens on (0.0.0.0 for the network).")]
    = "127.0.0.1",
    serve_port: Annotated[int, typer.Option(min=0, max=65535, help="Predict port (0: any free one).")]
    = DEFAULT_SERVE_PORT,
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="Prometheus metrics on --serve-host (Predict "
                                              "latency and deadline misses per density, density, heartbeats), "
                                              "behind Predict's mutual TLS (0: any free port).")]
    = DEFAULT_METRICS_PORT,
    supernode_port: Annotated[int, typer.Option(min=1, max=65535, help="The SuperNode's ClientAppIo port.")]
    = DEFAULT_SUPERNODE_PORT,
    partition_id: Annotated[int, typer.Option(min=0, help="This device's training shard.")] = 0,
    num_partitions: Annotated[int, typer.Option(min=1, help="Shards the training set is split into.")] = 1,
    state_dir: Annotated[Optional[Path], typer.Option(
        help="SuperNode home, logs and the device's credential (default: ./state/agent-<name or profile>).")]
    = None,
    heartbeat_interval: Annotated[Optional[float], typer.Option(
        min=0.05, help="Seconds between budget heartbeats (default: as often as the coordinator asks; never "
                       "less often).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset files for local training. " + DATA_DIR_HELP)]
    = None,
    calibration_repeats: Annotated[int, typer.Option(min=1, help="Timed passes per density.")] = DEFAULT_REPEATS,
    training_calibration_steps: Annotated[int, typer.Option(min=0, help="Timed training steps (batch 32) per "
                                          "density, so the coordinator trains this device at a density whose "
                                          "step fits it; 0 skips them (training is then assumed to fit).")]
    = DEFAULT_TRAIN_REPEATS,
    threads: Annotated[int, typer.Option(min=1, help="Kernel threads for inference (and so for calibration): "
                                         "1 keeps batch-1 latency steady when other work shares the cores.")] = 1,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the coordinator.")] = 5.0,
    ca: Annotated[Optional[Path], typer.Option(help="The fleet's CA certificate (ca.pem): TLS to the coordinator and the SuperLink, required unless both are on loopback.")] = None,
    predict_cert: Annotated[Optional[Path], typer.Option(help="Certificate of the Predict listener (`dress-fleet certs issue NAME --host HOST`): with --predict-key and --ca, Predict and Status serve TLS and answer only callers with a client certificate of the fleet; required unless --serve-host is loopback.")] = None,
    predict_key: Annotated[Optional[Path], typer.Option(help="The Predict certificate's private key.")] = None,
    fetch_float16: Annotated[bool, typer.Option("--fetch-float16", help="Download each published model with its "
                             "weights as float16: about 40% fewer bytes, computed in float32 (accuracy change in "
                             "benchmarks/results/half.md).")] = False,
    check_set: Annotated[Optional[str], typer.Option(help=f"{CHECK_SET_FORM}: labelled images this device keeps "
                         f"to check each model version on before serving it — N (default {DEFAULT_CHECK_EXAMPLES}) "
                         "of DATASET's test split in --data-dir (or where its Debian package put it), drawn by the "
                         "device's name. The results go to the coordinator, whose staged rollouts roll a canary "
                         "version back when its accuracy there falls below the stable version's; without it, "
                         "rollouts judge by Predict's confidence alone, which cannot see a model sure of wrong "
                         "answers.")] = None,
) -> None:
    """Join the fleet: learn its model, calibrate, register, train through a Flower SuperNode, serve Predict."""
    try:
        profile = get_profile(device)
    except UnknownProfileError as e:
        raise fail(str(e)) from None
    try:
        if name is not None:
            check_name(name)
    except ValueError as e:
        raise fail(f"--name: {e}") from None
    coordinator, superlink = parse_address(coordinator, "--coordinator"), parse_address(superlink, "--superlink")
    if partition_id >= num_partitions:
        raise fail(f"--partition-id must be below --num-partitions ({num_partitions}), got {partition_id}")
    if check_set is not None:
        try:
            parse_check_set(check_set)
        except ValueError as e:
            raise fail(str(e)) from None
    try:
        source = budget_source(profile, budget_trace)
    except ValueError as e:  # BudgetTraceError
        raise fail(f"--budget-trace: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    node_config = {"partition-id": partition_id, "num-partitions": num_partitions,
                   **({"data-dir": str(data_dir)} if data_dir else {})}
    agent = Agent(AgentConfig(
        name=name, profile=profile, coordinator=coordinator, superlink=superlink, budget=source,
        state_dir=state_dir or Path("state") / f"agent-{name or device}", token=token, serve_host=serve_host, serve_port=serve_port,
        supernode_port=supernode_port, node_config=node_config, heartbeat_interval=heartbeat_interval,
        calibration_repeats=calibration_repeats, training_calibration_steps=training_calibration_steps,
        threads=threads, connect_timeout=connect_timeout, ca=ca,
        predict_cert=predict_cert, predict_key=predict_key, fetch_float16=fetch_float16, metrics_port=metrics_port,
        check_set=check_set))
    with shutdown_requested() as stop:
        try:
            agent.start()
        except AgentError as e:
            raise fail(str(e), code=e.code) from None
        try:
            console.print(calibration_table(agent.calibration))
            console.print(where_table(agent, budget_trace))
            name = agent.identity.name  # type: ignore[union-attr]
            console.print(f"[bold green]dress-agent {escape(name)} ready[/]: Predict on "
                          f"{serve_host}:{agent.predict.port}, metrics on {serve_host}:{agent.metrics_port}/metrics; "  # type: ignore[union-attr]
                          "Ctrl-C to leave")
            clean = agent.wait(stop)
            if not clean:
                sn = agent.supernode
                err.print(f"[bold red]error:[/] the SuperNode exited (code {sn.proc.returncode}); "  # type: ignore[union-attr]
                          f"its log {sn.log_path} ends:\n{safe_text(sn.tail())}")  # type: ignore[union-attr]
            console.print("shutting down: budget monitor, Predict server, SuperNode")
        finally:
            agent.stop()
    if not clean:
        raise typer.Exit(1)
    console.print(f"dress-agent {escape(agent.identity.name if agent.identity else '')} stopped")


def where_table(agent: Agent, trace: Path | None) -> Table:
    c, identity, state = agent.config, agent.identity, agent.served.state()  # type: ignore[union-attr]
    table = Table(title=f"dress-agent {identity.name} ({identity.profile}), device id {identity.device_id}",  # type: ignore[union-attr]
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    supernode = agent.supernode
    rows = [
        ("coordinator", c.coordinator),
        ("Predict (gRPC + health)", f"{c.serve_host}:{agent.predict.port}"),  # type: ignore[union-attr]
        ("SuperNode", f"pid {supernode.proc.pid} -> SuperLink {c.superlink}; log {supernode.log_path}"),  # type: ignore[union-attr]
        ("budget", f"trace {trace}" if trace else "this machine (CPU load, free memory, battery)"),
        ("density", f"{state.density:g} (stored: {', '.join(f'{d:g}' for d in state.densities)})"),
        ("model version", state.version or "none yet: serving the untrained initial model"),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


CaOption = Annotated[Optional[Path], typer.Option(help="The fleet's CA (ca.pem), for an agent serving TLS.")]
CertOption = Annotated[Optional[Path], typer.Option(
    help="Your client certificate (`dress-fleet certs issue NAME --client`), for an agent serving TLS.")]
KeyOption = Annotated[Optional[Path], typer.Option(help="Your client certificate's private key.")]


def agent_call(address: str, what: str, call: Callable[[agent_grpc.AgentStub], T], ca: Path | None = None,
               cert: Path | None = None, key: Path | None = None) -> T:
    """One call to an agent: plaintext, or mutual TLS with the fleet CA and a client certificate."""
    address = parse_address(address, "--agent")
    if (ca, cert, key) == (None, None, None):
        channel = grpc.insecure_channel(address)
    elif None in (ca, cert, key):
        raise fail("TLS to an agent needs all of --ca, --cert and --key")
    else:
        try:
            channel = grpc.secure_channel(address, client_credentials(ca, cert, key))  # type: ignore[arg-type]
        except CertificateError as e:
            raise fail(str(e)) from None
    with channel:
        try:
            return call(agent_grpc.AgentStub(channel))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise fail(f"cannot reach agent at {address}: {e.details()}", code=1) from None
            raise fail(f"{what} at {address} failed: {e.code().name}: {e.details()}", code=1) from None


@app.command("predict")
def predict_cmd(
    agent: Annotated[str, typer.Option(help="A running agent's Predict address, HOST:PORT.")],
    index: Annotated[int, typer.Option(min=0, help="Which test image to send.")] = 0,
    dataset: Annotated[str, typer.Option(help="Dataset whose test split provides the image. " + DATASET_HELP)]
    = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option(help=DATA_DIR_HELP)] = None,
    density_only: Annotated[bool, typer.Option(help="Print only the density that answered (for scripts).")]
    = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the answer.")] = 10.0,
    deadline_ms: Annotated[float, typer.Option(min=0.0, help="Answer within this many ms: the agent runs the densest subnet, up to its assignment, it expects to meet it (0: the assigned one).")] = 0.0,
    ca: CaOption = None,
    cert: CertOption = None,
    key: KeyOption = None,
) -> None:
    """Send one test image to a running agent; print its answer and the density that produced it."""
    try:
        test_set = load_dataset(dataset, "test", data_dir)
    except DataError as e:
        raise fail(str(e)) from None
    if index >= len(test_set):
        raise fail(f"--index must be below {len(test_set)}, got {index}")
    image = test_set.images[index]
    request = agent_pb.PredictRequest(input=image.reshape(-1).tolist(), shape=list(image.shape),
                                      deadline_ms=deadline_ms)
    answer = agent_call(agent, "Predict", lambda stub: stub.Predict(request, timeout=timeout), ca, cert, key)
    if density_only:
        print(f"{answer.density:g}")
        return
    logits = list(answer.logits)
    predicted = max(range(len(logits)), key=logits.__getitem__)
    label = int(test_set.labels[index])
    console.print(f"image {index}: predicted class {predicted}, label {label} "
                  f"({'right' if predicted == label else 'wrong'}); density {answer.density:g}, "
                  f"{answer.latency_ms:.3f} ms on the device")


@app.command("status")
def status_cmd(
    agent: Annotated[str, typer.Option(help="A running agent's Predict address, HOST:PORT.")],
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the answer.")] = 10.0,
    ca: CaOption = None,
    cert: CertOption = None,
    key: KeyOption = None,
) -> None:
    """Show what a running agent serves: device, density (assigned and running), model version."""
    s = agent_call(agent, "Status", lambda stub: stub.Status(agent_pb.StatusRequest(), timeout=timeout), ca, cert,
                   key)
    console.print(f"{s.name} ({s.profile}), device id {s.device_id}: density {s.density:g} "
                  f"(assigned {s.assigned_density:g}); model version {s.model_version or 'none (untrained)'}; "
                  f"stored densities {', '.join(f'{d:g}' for d in s.densities)}")


def main() -> None:
    app()
