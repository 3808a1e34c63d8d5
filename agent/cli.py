"""`dress-agent`: run a device of the fleet (`join`), and ask a running one for an answer (`predict`, `status`).

`join` wires the agent's parts together in the order each depends on the previous: check the inputs and the
coordinator before spending seconds on calibration; calibrate before registering (registration carries the
measurements); register before serving (the coordinator assigns the first density); stop in reverse.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import grpc
import torch
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from agent.budget import BudgetSource, MachineBudget, TraceBudget
from agent.calibration import DATASET_SHAPES, DEFAULT_REPEATS, calibrate, dataset_input_shape, initial_model
from agent.monitor import DEFAULT_INTERVAL_S, BudgetMonitor
from agent.serving import AgentIdentity, ModelFetchError, ModelUpdater, ServedModel, serve
from coordinator.flower_runtime import ManagedProcess, start_supernode
from coordinator.policy import CalibrationPoint
from coordinator.profiles import Profile, UnknownProfileError, get_profile
from dress_model.data import DataError, load_dataset
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CONTROL_PLANE = pb.DESCRIPTOR.services_by_name["ControlPlane"].full_name
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it also names files under --state-dir
DEFAULT_SERVE_PORT = 50061
DEFAULT_SUPERNODE_PORT = 9094  # Flower's default ClientAppIo port
SUPERVISE_EVERY_S = 1.0
T = TypeVar("T")

app = typer.Typer(
    help="dress-agent: an edge device of a DRESS fleet. `join` calibrates this machine, registers with the "
    "coordinator, trains with the federation through a Flower SuperNode and serves inference at the density "
    "its current budget affords; `predict` and `status` ask a running agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Exit code 2 for bad input, 1 for an environment that does not cooperate (unreachable peers)."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def parse_address(value: str, option: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(f"{option} must be HOST:PORT, got {value!r}")
    return value


def default_name(profile: str) -> str:
    """<hostname>-<profile>: stable across restarts, so re-registering keeps the device's id and history."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "device"
    return f"{host}-{profile}"


def connect_coordinator(address: str, timeout: float) -> grpc.Channel:
    """A channel to a coordinator whose control plane answers its health check; ConnectionError otherwise."""
    # gRPC backs off reconnecting up to 2 minutes by default; a restarted coordinator should hear from
    # its fleet within a few heartbeats instead.
    channel = grpc.insecure_channel(address, options=[("grpc.max_reconnect_backoff_ms", 10_000)])
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=CONTROL_PLANE), timeout=timeout, wait_for_ready=True)
    except grpc.RpcError as e:
        channel.close()
        raise ConnectionError(f"cannot reach coordinator at {address} within {timeout:g} s "
                              f"({e.code().name}: {e.details()})") from None
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        channel.close()
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        raise ConnectionError(f"coordinator at {address} is not serving its control plane ({status})")
    return channel


def budget_source(profile: Profile, trace: Path | None) -> BudgetSource:
    return MachineBudget(profile) if trace is None else TraceBudget.from_file(trace)


def calibration_table(points: list[CalibrationPoint]) -> Table:
    table = Table(title="calibration on this machine")
    for column in ("density", "latency ms (median, batch 1)", "memory MB"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(f"{p.density:g}", f"{p.latency_ms:.3f}", f"{p.memory_mb:.2f}")
    return table


def register(stub: pb_grpc.ControlPlaneStub, name: str, profile: str, points: list[CalibrationPoint],
             timeout: float) -> pb.RegisterResponse:
    calibration = [pb.CalibrationPoint(density=p.density, latency_ms=p.latency_ms, memory_mb=p.memory_mb)
                   for p in points]
    return stub.Register(pb.RegisterRequest(name=name, profile=profile, calibration=calibration), timeout=timeout)


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


def wait_until_stopped(stop: threading.Event, supernode: ManagedProcess) -> bool:
    """Block until a signal (True) or the SuperNode's death (False): without it the device cannot train."""
    while not stop.wait(SUPERVISE_EVERY_S):
        if not supernode.alive():
            return False
    return True


@app.command("join")
def join_cmd(
    device: Annotated[str, typer.Option(help="Device profile from coordinator/profiles.toml, e.g. pi4.")],
    coordinator: Annotated[str, typer.Option(help="Coordinator control plane, HOST:PORT.")],
    superlink: Annotated[str, typer.Option(help="Flower SuperLink Fleet API, HOST:PORT.")],
    name: Annotated[Optional[str], typer.Option(help="Unique device name (default: <hostname>-<profile>).")] = None,
    budget_trace: Annotated[Optional[Path], typer.Option(
        help="Replay budgets from a CSV (t_s,latency_ms,memory_mb[,battery]) or JSON trace instead of "
        "reading this machine's load and memory.")] = None,
    serve_host: Annotated[str, typer.Option(help="Interface Predict listens on (0.0.0.0 for the network).")]
    = "127.0.0.1",
    serve_port: Annotated[int, typer.Option(min=0, max=65535, help="Predict port (0: any free one).")]
    = DEFAULT_SERVE_PORT,
    supernode_port: Annotated[int, typer.Option(min=1, max=65535, help="The SuperNode's ClientAppIo port.")]
    = DEFAULT_SUPERNODE_PORT,
    partition_id: Annotated[int, typer.Option(min=0, help="This device's training shard.")] = 0,
    num_partitions: Annotated[int, typer.Option(min=1, help="Shards the training set is split into.")] = 1,
    state_dir: Annotated[Optional[Path], typer.Option(
        help="SuperNode home and logs (default: ./state/agent-<name>).")] = None,
    heartbeat_interval: Annotated[float, typer.Option(min=0.05, help="Seconds between budget heartbeats.")]
    = DEFAULT_INTERVAL_S,
    model: Annotated[str, typer.Option(help="Architecture the fleet trains (for calibration).")] = "cnn",
    densities: Annotated[str, typer.Option(help="Subnet densities the fleet trains.")] = "1,0.5,0.25,0.1",
    width: Annotated[int, typer.Option(min=1, help="Base channel width of the model.")] = 16,
    dataset: Annotated[str, typer.Option(help=f"One of {', '.join(DATASET_SHAPES)}: sets the input shape.")]
    = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset files for local training.")] = None,
    calibration_repeats: Annotated[int, typer.Option(min=1, help="Timed passes per density.")] = DEFAULT_REPEATS,
    threads: Annotated[int, typer.Option(min=1, help="Kernel threads for inference (and so for calibration): "
                                         "1 keeps batch-1 latency steady when other work shares the cores.")] = 1,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the coordinator.")] = 5.0,
) -> None:
    """Join the fleet: calibrate, register, train through a Flower SuperNode, serve Predict; Ctrl-C leaves."""
    try:
        profile = get_profile(device)
    except UnknownProfileError as e:
        raise fail(str(e)) from None
    name = name or default_name(device)
    if not NAME_PATTERN.fullmatch(name):
        raise fail(f"--name must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                   f"got {name!r}")
    coordinator, superlink = parse_address(coordinator, "--coordinator"), parse_address(superlink, "--superlink")
    if partition_id >= num_partitions:
        raise fail(f"--partition-id must be below --num-partitions ({num_partitions}), got {partition_id}")
    try:
        packed = initial_model(model, densities, dataset, width)
        source = budget_source(profile, budget_trace)
    except ValueError as e:  # unknown model/dataset, bad densities, BudgetTraceError
        raise fail(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    try:
        channel = connect_coordinator(coordinator, connect_timeout)
    except ConnectionError as e:
        raise fail(str(e), code=1) from None
    with channel:
        stub = pb_grpc.ControlPlaneStub(channel)
        torch.set_num_threads(threads)  # before calibrating: what is measured must be what serves
        points = calibrate(packed, dataset_input_shape(dataset), calibration_repeats)
        console.print(calibration_table(points))
        try:
            registration = register(stub, name, device, points, connect_timeout)
        except grpc.RpcError as e:
            raise fail(f"coordinator at {coordinator} refused registration: {e.code().name}: {e.details()}",
                       code=1) from None
        served = ServedModel(packed, registration.density)
        updater = ModelUpdater(served, stub, registration.device_id, fetch_density=max(packed.densities))
        if registration.model_version:
            try:
                updater(registration.model_version)
            except ModelFetchError as e:
                log.warning("serving the untrained initial model for now: %s", e)
        identity = AgentIdentity(name, registration.device_id, device)
        node_config = {"device-id": name, "profile": device, "partition-id": partition_id,
                       "num-partitions": num_partitions, **({"data-dir": str(data_dir)} if data_dir else {})}
        state = state_dir or Path("state") / f"agent-{name}"
        with shutdown_requested() as stop, contextlib.ExitStack() as running:
            supernode = start_supernode(state, superlink, supernode_port, node_config, f"supernode-{name}")
            running.callback(supernode.stop)
            try:
                predict = serve(served, identity, serve_host, serve_port)
            except RuntimeError as e:  # the port is taken
                raise fail(str(e), code=1) from None
            running.callback(predict.stop)
            monitor = BudgetMonitor(stub, registration.device_id, source, density=served.assigned_density,
                                    model_version=served.version, on_density=served.set_density,
                                    on_model_version=updater, interval=heartbeat_interval)
            monitor.start()
            running.callback(monitor.stop)
            console.print(where_table(identity, coordinator, superlink, f"{serve_host}:{predict.port}",
                                      supernode, budget_trace, served))
            console.print(f"[bold green]dress-agent {escape(name)} ready[/]: Predict on {serve_host}:{predict.port}; "
                          "Ctrl-C to leave")
            clean = wait_until_stopped(stop, supernode)
            if not clean:
                err.print(f"[bold red]error:[/] the SuperNode exited (code {supernode.proc.returncode}); "
                          f"its log {supernode.log_path} ends:\n{escape(supernode.tail())}")
            console.print("shutting down: budget monitor, Predict server, SuperNode")
    if not clean:
        raise typer.Exit(1)
    console.print(f"dress-agent {escape(name)} stopped")


def where_table(identity: AgentIdentity, coordinator: str, superlink: str, predict: str,
                supernode: ManagedProcess, trace: Path | None, served: ServedModel) -> Table:
    state = served.state()
    table = Table(title=f"dress-agent {identity.name} ({identity.profile}), device id {identity.device_id}",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("coordinator", coordinator),
        ("Predict (gRPC + health)", predict),
        ("SuperNode", f"pid {supernode.proc.pid} -> SuperLink {superlink}; log {supernode.log_path}"),
        ("budget", f"trace {trace}" if trace else "this machine (CPU load, free memory, battery)"),
        ("density", f"{state.density:g} (stored: {', '.join(f'{d:g}' for d in state.densities)})"),
        ("model version", state.version or "none yet: serving the untrained initial model"),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def agent_call(address: str, what: str, call: Callable[[agent_grpc.AgentStub], T]) -> T:
    with grpc.insecure_channel(parse_address(address, "--agent")) as channel:
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
    dataset: Annotated[str, typer.Option(help="Dataset whose test split provides the image.")] = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option()] = None,
    density_only: Annotated[bool, typer.Option(help="Print only the density that answered (for scripts).")]
    = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the answer.")] = 10.0,
) -> None:
    """Send one test image to a running agent; print its answer and the density that produced it."""
    try:
        test_set = load_dataset(dataset, "test", data_dir)
    except DataError as e:
        raise fail(str(e)) from None
    if index >= len(test_set):
        raise fail(f"--index must be below {len(test_set)}, got {index}")
    image = test_set.images[index]
    request = agent_pb.PredictRequest(input=image.reshape(-1).tolist(), shape=list(image.shape))
    answer = agent_call(agent, "Predict", lambda stub: stub.Predict(request, timeout=timeout))
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
) -> None:
    """Show what a running agent serves: device, density (assigned and running), model version."""
    s = agent_call(agent, "Status", lambda stub: stub.Status(agent_pb.StatusRequest(), timeout=timeout))
    console.print(f"{s.name} ({s.profile}), device id {s.device_id}: density {s.density:g} "
                  f"(assigned {s.assigned_density:g}); model version {s.model_version or 'none (untrained)'}; "
                  f"stored densities {', '.join(f'{d:g}' for d in s.densities)}")
