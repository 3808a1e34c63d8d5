"""The agent against a real coordinator (control plane + registry on SQLite) over loopback gRPC.

Predict and its bad inputs, density switches that do not reload, model versions fetched, verified and
swapped, and the budget monitor moving the served density (and the registry's row) heartbeat by heartbeat.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from conftest import DeviceStub, architecture, enrolled, pick_port, until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.budget import TraceBudget, TracePoint
from agent.calibration import initial_model
from agent.latency import LatencyModel
from agent.model_fetch import ModelFetchError, ModelUpdater, fetch_model
from agent.monitor import BudgetMonitor
from agent.served_model import ServedModel, serving_density
from agent.serving import MAX_BATCH, SERVICE_NAME, AgentIdentity, AgentServer, serve
from agent.version_check import (
    DEFAULT_CHECK_EXAMPLES,
    CheckLedger,
    CheckSet,
    VersionChecker,
    parse_check_set,
    unfit,
)
from contracts.policy import Budget, CalibrationPoint
from coordinator import control_plane
from coordinator.registry import AssignmentReason, Registry
from dress_model.data import load_dataset
from dress_model.packed import PackedModel
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

DENSITIES = "1,0.5,0.25,0.1"
# 100 ms / 800 MB dense down to 10 ms / 80 MB at 0.1; pi4's first density is 0.25 (its tight end is 256 MB).
CALIBRATION = [CalibrationPoint(d, 100 * d, 800 * d) for d in (1.0, 0.5, 0.25, 0.1)]
LOOSE, TIGHT = Budget(1000, 10_000), Budget(1000, 300)  # densest subnet fits / 0.25 is the densest that fits
ARCH = architecture("cnn", DENSITIES, "fashion-mnist", 8)
LEVEL = {d: level for level, d in enumerate(ARCH.densities)}  # a density crosses the wire as its level


def _image(batch: int | None = None) -> tuple[torch.Tensor, agent_pb.PredictRequest]:
    x = torch.randn(batch or 1, 1, 28, 28, generator=torch.Generator().manual_seed(batch or 1))
    shape = list(x.shape) if batch else list(x.shape[1:])
    return x, agent_pb.PredictRequest(input=x.reshape(-1).tolist(), shape=shape)


class Coordinator:
    """A registry plus the real control plane, and the packed models it hands out per version."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.registry = Registry(f"sqlite:///{tmp_path / 'registry.sqlite3'}")
        self.port, self.address = port, f"127.0.0.1:{port}"
        self.model: PackedModel | None = None
        self.server: grpc.Server | None = None

    def provide(self, density: float, half: bool = False) -> bytes:
        if self.model is None:
            raise LookupError("nothing published")
        return PackedModel.from_dress(self.model.to_dress().eval(), max_density=density).to_bytes(half)

    def publish(self, version: str, model: PackedModel) -> None:
        self.model = model  # before the registry announces it, so a fetch never sees the version without it
        self.registry.add_model_version(version, f"/models/{version}", model.densities)

    def start(self) -> None:
        # looked up per request, so a test can swap in another provider
        self.server = control_plane.serve(self.registry, "127.0.0.1", self.port,
                                          ARCH,
                                          lambda v, d, half: self.provide(d, half), max_workers=4)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
        self.registry.close()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator(tmp_path, pick_port())
    c.start()
    yield c
    c.stop()


@pytest.fixture
def stub(coordinator: Coordinator) -> Iterator[DeviceStub]:
    """Device pi-kitchen's view of the control plane: enrolled, registered once ``device_id`` is asked for."""
    with grpc.insecure_channel(coordinator.address) as channel:
        yield enrolled(channel, coordinator.registry, "pi-kitchen")


def _register(stub: DeviceStub) -> int:
    return stub.Register(pb.RegisterRequest(name="pi-kitchen", profile="pi4", calibration=[
        pb.CalibrationPoint(level=LEVEL[p.density], latency_ms=p.latency_ms, memory_mb=p.memory_mb)
        for p in CALIBRATION]), timeout=5).device_id


@pytest.fixture
def device_id(stub: DeviceStub) -> int:
    return _register(stub)


@pytest.fixture
def served() -> ServedModel:
    return ServedModel(initial_model(architecture("cnn", DENSITIES, "fashion-mnist", 8)), 1.0)


@pytest.fixture
def agent(served: ServedModel) -> Iterator[AgentServer]:
    server = serve(served, AgentIdentity("pi-kitchen", 7, "pi4"), "127.0.0.1", 0)
    yield server
    server.stop(grace=0)


@pytest.fixture
def agent_stub(agent: AgentServer) -> Iterator[agent_grpc.AgentStub]:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        yield agent_grpc.AgentStub(channel)


def _buffers(packed: PackedModel) -> list[int]:
    return [t.data_ptr() for _, layer in packed.packed_layers() for t in (layer.values, layer.indices)]


# -- Predict -------------------------------------------------------------------------------------------------


def test_predict_answers_and_switches_density_without_reloading(
    served: ServedModel, agent: AgentServer, agent_stub: agent_grpc.AgentStub
) -> None:
    packed, buffers = served.packed, _buffers(served.packed)
    x, request = _image()
    answer = agent_stub.Predict(request)
    assert list(answer.shape) == [1, 10] and answer.density == 1.0 and answer.latency_ms > 0
    assert torch.allclose(torch.tensor(answer.logits), packed(x).reshape(-1), atol=1e-5)

    assert served.set_density(0.25) == 0.25
    sparse = agent_stub.Predict(request)
    assert sparse.density == 0.25
    packed.set_density(0.25)
    assert torch.allclose(torch.tensor(sparse.logits), packed(x).reshape(-1), atol=1e-5)
    assert not torch.allclose(torch.tensor(sparse.logits), torch.tensor(answer.logits))
    assert served.packed is packed and _buffers(packed) == buffers  # same buffers: a switch, not a reload

    xs, batch = _image(batch=3)
    answer = agent_stub.Predict(batch)
    assert list(answer.shape) == [3, 10]
    assert torch.allclose(torch.tensor(answer.logits).reshape(3, 10), packed(xs), atol=1e-5)


def test_assignments_between_stored_densities_run_the_densest_that_fits() -> None:
    stored = (0.1, 0.25, 0.5, 1.0)
    assert serving_density(stored, 0.3) == 0.25
    assert serving_density(stored, 1.0) == 1.0
    assert serving_density(stored, 0.05) == 0.1  # nothing fits: the sparsest is the least bad
    assert serving_density(stored, 1.0, local=0.5) == serving_density(stored, 0.5, local=1.0) == 0.5


@pytest.mark.parametrize(("values", "shape", "message"), [
    ([], [1, 28, 28], "input is empty"),
    ([0.0] * 784, [784], "shape must be [C, H, W] or [N, C, H, W]"),
    ([0.0] * 784, [1, 0, 28, 28], "of positive sizes"),
    ([0.0] * 783, [1, 28, 28], "shape [1, 28, 28] needs 784 values, got 783"),
    ([0.0] * 3 * 32 * 32, [3, 32, 32], "input shape [3, 32, 32] does not match the model's [C, H, W] = [1, 28, 28]"),
    ([0.0] * 783 + [float("nan")], [1, 28, 28], "1 NaN or infinite values"),
    ([float("inf")] * 784, [1, 28, 28], "784 NaN or infinite values"),
    ([0.0] * (MAX_BATCH + 1), [MAX_BATCH + 1, 1, 1, 1], f"at most {MAX_BATCH} per request"),
])
def test_bad_predict_input_is_invalid_argument(
    agent_stub: agent_grpc.AgentStub, values: list[float], shape: list[int], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        agent_stub.Predict(agent_pb.PredictRequest(input=values, shape=shape))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_health_and_status(agent: AgentServer, agent_stub: agent_grpc.AgentStub, served: ServedModel) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    served.set_density(0.3)
    status = agent_stub.Status(agent_pb.StatusRequest())
    assert (status.name, status.device_id, status.profile) == ("pi-kitchen", 7, "pi4")
    assert (status.density, status.assigned_density, status.model_version) == (0.25, 0.3, "")
    assert list(status.densities) == [0.1, 0.25, 0.5, 1.0]


# -- model versions ------------------------------------------------------------------------------------------


def test_new_version_is_fetched_verified_and_swapped_atomically(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel,
    agent_stub: agent_grpc.AgentStub,
) -> None:
    served.set_density(0.5)
    trained = initial_model(architecture("cnn", DENSITIES, "fashion-mnist", 8))
    coordinator.publish("v1", trained)
    updater = ModelUpdater(served, stub, fetch_level=LEVEL[1.0])
    updater("v1")
    assert served.version == "v1" and served.packed.densities == (0.1, 0.25, 0.5, 1.0)
    x, request = _image()
    answer = agent_stub.Predict(request)
    trained.set_density(0.5)
    assert answer.density == 0.5  # the assignment carries over to the new model
    assert torch.allclose(torch.tensor(answer.logits), trained(x).reshape(-1), atol=1e-5)
    assert agent_stub.Status(agent_pb.StatusRequest()).model_version == "v1"

    swapped = served.packed
    updater("v1")  # already served: no download
    assert served.packed is swapped


def test_fetch_at_a_lower_density_stores_only_the_subnets_up_to_it(
    coordinator: Coordinator, stub: DeviceStub, device_id: int
) -> None:
    coordinator.publish("v1", initial_model(architecture("cnn", DENSITIES, "fashion-mnist", 8)))
    fetched = fetch_model(stub, LEVEL[0.25])
    assert fetched.version == "v1" and fetched.packed.densities == (0.1, 0.25)
    assert fetched.nbytes == len(coordinator.provide(0.25))


def test_a_float16_download_is_smaller_and_serves_in_float32(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    coordinator.publish("v1", initial_model(architecture("cnn", DENSITIES, "fashion-mnist", 8)))
    full, half = fetch_model(stub, LEVEL[1.0]), fetch_model(stub, LEVEL[1.0], half=True)
    assert half.nbytes < 0.7 * full.nbytes
    assert all(t.dtype == torch.float32 for t in half.packed.net.state_dict().values() if t.is_floating_point())
    x = torch.randn(2, 1, 28, 28)
    for d in full.packed.densities:
        full.packed.set_density(d)
        half.packed.set_density(d)
        torch.testing.assert_close(half.packed(x), full.packed(x), rtol=0.02, atol=0.02)
    ModelUpdater(served, stub, fetch_level=LEVEL[1.0], half=True)("v1")
    assert served.version == "v1"


def test_failed_fetches_leave_the_served_model_alone(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    before = served.packed
    updater = ModelUpdater(served, stub, fetch_level=LEVEL[1.0])
    with pytest.raises(ModelFetchError, match="NOT_FOUND: no packed model at density 1"):
        updater("v1")
    with pytest.raises(ModelFetchError, match=r"INVALID_ARGUMENT: level must be an integer in \[0, 3\]"):
        fetch_model(stub, 4)
    coordinator.provide = lambda density, half: b"not a model"  # type: ignore[method-assign]
    with pytest.raises(ModelFetchError, match="is not a packed DRESS model"):
        updater("v1")
    assert served.packed is before and served.version == ""


class TamperingControlPlane(pb_grpc.ControlPlaneServicer):
    """Streams whatever chunks a test scripts: what a broken network or a confused server could send."""

    def __init__(self) -> None:
        self.chunks: list[pb.ModelChunk] = []

    def FetchModel(self, request: pb.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        yield from self.chunks


@pytest.fixture
def tampering() -> Iterator[tuple[TamperingControlPlane, pb_grpc.ControlPlaneStub]]:
    servicer = TamperingControlPlane()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ControlPlaneServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield servicer, pb_grpc.ControlPlaneStub(channel)
    server.stop(grace=None).wait()


def test_corrupt_downloads_are_refused(tampering: tuple[TamperingControlPlane, pb_grpc.ControlPlaneStub]) -> None:
    servicer, stub = tampering
    data = initial_model(architecture("cnn", "1,0.5", "mnist", 4)).to_bytes()
    digest, half = hashlib.sha256(data).hexdigest(), len(data) // 2

    def chunk(payload: bytes, offset: int, **overrides: object) -> pb.ModelChunk:
        fields = {"total_size": len(data), "sha256": digest, "model_version": "v9", "level": 1, **overrides}
        return pb.ModelChunk(data=payload, offset=offset, **fields)

    cases = [
        ([], "FetchModel answered no chunks"),
        ([chunk(data[:half], 0)], f"ended after {half:,} of {len(data):,} bytes"),
        ([chunk(data[:half], 0), chunk(data[half + 1:], half + 1)], f"at offset {half + 1} does not follow"),
        ([chunk(data + b"x", 0)], "does not follow"),
        ([chunk(data[:half], 0), chunk(data[half:], half, model_version="v10")], "chunks disagree"),
        ([chunk(data[:-1] + bytes([data[-1] ^ 1]), 0)], "failed its sha256 check"),
        ([chunk(b"", 0, total_size=1 << 40)], "announced a 1,099,511,627,776-byte model"),
    ]
    for chunks, message in cases:
        servicer.chunks = chunks
        with pytest.raises(ModelFetchError) as caught:
            fetch_model(stub, 1)
        assert message in str(caught.value)
    servicer.chunks = [chunk(data[:half], 0), chunk(data[half:], half)]
    assert fetch_model(stub, 1).version == "v9"


# -- budget monitor ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _monitor(stub: DeviceStub, served: ServedModel, trace: TraceBudget,
             interval: float = 0.05, **kwargs: object) -> BudgetMonitor:
    return BudgetMonitor(stub, ARCH.densities, trace, density=served.assigned_density, model_version=served.version,
                         on_density=served.set_density,
                         on_model_version=ModelUpdater(served, stub, fetch_level=LEVEL[1.0]),
                         interval=interval, **kwargs)  # type: ignore[arg-type]


def test_budget_changes_move_the_served_density_and_the_registry_row(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    registry, clock = coordinator.registry, Clock()
    served.set_density(registry.get_device(device_id).current_density)  # as `join` does with Register's answer
    assert served.state().density == 0.25
    buffers = _buffers(served.packed)
    trace = TraceBudget([TracePoint(0, LOOSE), TracePoint(10, TIGHT), TracePoint(20, LOOSE)], clock)
    monitor = _monitor(stub, served, trace, interval=0.1)

    assert monitor.heartbeat_now().changed
    assert served.state().density == registry.get_device(device_id).current_density == 1.0
    clock.now = 10
    monitor.heartbeat_now()
    assert served.state().density == registry.get_device(device_id).current_density == 0.25
    assert _buffers(served.packed) == buffers

    monitor.start()
    try:
        time.sleep(0.15)
        clock.now = 20
        took = until(lambda: served.state().density == 1.0, timeout=5)
        assert took < 0.1 + 1.0  # one interval, plus the round trip on a busy machine
        assert registry.get_device(device_id).current_density == 1.0
    finally:
        monitor.stop()
    history = registry.device_history(device_id)
    assert [(h.density, h.reason) for h in history[-3:]] == [
        (1.0, AssignmentReason.BUDGET_CHANGE), (0.25, AssignmentReason.BUDGET_CHANGE),
        (1.0, AssignmentReason.BUDGET_CHANGE)]
    assert history[-2].budget == TIGHT


def test_monitor_swaps_in_a_published_version(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    monitor = _monitor(stub, served, TraceBudget([TracePoint(0, TIGHT)]))
    monitor.heartbeat_now()
    assert served.version == "" and monitor.model_version == ""
    coordinator.publish("v1", initial_model(architecture("cnn", DENSITIES, "fashion-mnist", 8)))
    assert monitor.heartbeat_now().model_version == "v1"
    assert served.version == monitor.model_version == "v1"
    assert served.state().density == 0.25


def test_monitor_retries_a_failing_model_download_at_the_next_heartbeat(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    coordinator.registry.add_model_version("v1", "/models/v1", [1.0])  # announced, but not downloadable yet
    monitor = _monitor(stub, served, TraceBudget([TracePoint(0, TIGHT)]))
    assert monitor.heartbeat_now().level == LEVEL[0.25]  # the heartbeat itself works
    assert served.version == monitor.model_version == "" and served.state().density == 0.25
    coordinator.model = initial_model(architecture("cnn", DENSITIES, "fashion-mnist", 8))
    monitor.heartbeat_now()
    assert served.version == monitor.model_version == "v1"


def test_monitor_rides_out_a_coordinator_outage(tmp_path: Path, served: ServedModel) -> None:
    coordinator = Coordinator(tmp_path, pick_port())
    coordinator.start()
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = enrolled(channel, coordinator.registry, "pi-kitchen")
        device_id = _register(stub)
    coordinator.server.stop(grace=None).wait()  # type: ignore[union-attr]  # the registry stays, the plane goes
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                      ("grpc.max_reconnect_backoff_ms", 100)]
    with grpc.insecure_channel(coordinator.address, options=fast_reconnect) as channel:
        stub = DeviceStub(channel, stub.secret)
        monitor = _monitor(stub, served, TraceBudget([TracePoint(0, TIGHT)]), interval=0.02,
                           rpc_timeout=0.5, max_backoff=0.1)
        with pytest.raises(grpc.RpcError) as caught:
            monitor.heartbeat_now()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        monitor.start()
        try:
            until(lambda: monitor.failures >= 3, timeout=5)
            assert 0.02 <= monitor.next_delay() <= 0.1  # backing off, capped
            assert served.state().density == 1.0  # still serving the last assignment
            coordinator.start()
            until(lambda: monitor.failures == 0 and served.state().density == 0.25, timeout=5)
            assert coordinator.registry.get_device(device_id).current_density == 0.25
        finally:
            start = time.monotonic()
            monitor.stop()
            assert time.monotonic() - start < 1.0
            coordinator.stop()
    monitor.stop()  # idempotent
    assert not any(t.name.startswith("budget-monitor") for t in threading.enumerate())


@pytest.mark.parametrize("method", ["Predict", "Status"])
def test_predict_and_status_refuse_bytes_that_are_not_protobuf(agent: AgentServer, method: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff\xff\x0f", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- a request's deadline, decided on the device ---------------------------------------------------------------


def test_a_deadline_picks_the_densest_subnet_expected_to_meet_it_never_above_the_assignment(served) -> None:
    x, _ = _image(batch=4)
    served.latency = LatencyModel({1.0: 10.0, 0.5: 5.0, 0.25: 2.5, 0.1: 1.0})  # ms per image, as calibrated
    served.set_density(0.5)
    assert served.predict(x)[1] == 0.5  # no deadline: the assignment
    served.latency = LatencyModel({1.0: 10.0, 0.5: 5.0, 0.25: 2.5, 0.1: 1.0})
    assert served.predict(x, deadline_ms=11.0)[1] == 0.25  # 4 images: 0.5 needs 20 ms, 0.25 10 ms
    served.latency = LatencyModel({1.0: 10.0, 0.5: 5.0, 0.25: 2.5, 0.1: 1.0})
    assert served.predict(x, deadline_ms=1000.0)[1] == 0.5  # never above what the budget allows
    served.latency = LatencyModel({1.0: 10.0, 0.5: 5.0, 0.25: 2.5, 0.1: 1.0})
    assert served.predict(x, deadline_ms=0.5)[1] == 0.1  # none fits: the fastest answers
    assert served.state().density == 0.5  # the request's switch was for that request only
    served.latency = LatencyModel({1.0: 10.0, 0.5: 5.0, 0.25: 2.5, 0.1: 1.0})  # (the real passes were faster)
    logits, _, _ = served.predict(x, deadline_ms=11.0)
    served.packed.set_density(0.25)
    torch.testing.assert_close(logits, served.packed(x))  # it really ran the 0.25 subnet
    served.set_density(0.5)
    with pytest.raises(ValueError, match="deadline_ms"):
        served.predict(x, deadline_ms=float("nan"))


def test_the_latency_model_learns_one_slowdown_from_every_measured_pass() -> None:
    model = LatencyModel({1.0: 10.0, 0.5: 5.0}, window=3)
    model.observe(1.0, batch=2, measured_ms=60.0)  # 30 ms an image: throttled, or a foreground app took the CPU
    assert model.expected_ms(1.0, 1) == 30.0 and model.expected_ms(0.5, 1) == 15.0  # at once, for every density
    assert model.densest_within([1.0, 0.5], batch=1, deadline_ms=20.0) == 0.5
    for _ in range(2):  # the load is gone: the sparse passes bring the dense one back once the slow one has left
        model.observe(0.5, batch=1, measured_ms=5.0)
        assert model.expected_ms(1.0, 1) == 30.0
    model.observe(0.5, batch=1, measured_ms=5.0)
    assert model.expected_ms(1.0, 1) == 10.0 and model.densest_within([1.0, 0.5], 1, 20.0) == 1.0
    model.observe(0.25, batch=1, measured_ms=3.0)  # a density never calibrated is learnt from its first pass
    assert model.expected_ms(0.25, 2) == 6.0 and model.expected_ms(0.1, 1) is None
    with pytest.raises(ValueError, match="window"):
        LatencyModel({1.0: 10.0}, window=0)


def test_a_slow_pass_keeps_its_slowdown_for_a_window() -> None:
    """A busy process beside the agent slows a pass now and then; until that pass leaves the window only
    subnets with that much slack answer, whichever density the slow pass was."""
    model = LatencyModel({1.0: 10.0, 0.1: 1.0}, window=5)
    for _ in range(4):
        model.observe(0.1, batch=1, measured_ms=1.0)
    model.observe(0.1, batch=1, measured_ms=3.0)  # 3x slower
    assert model.expected_ms(1.0, 1) == 30.0 and model.densest_within([1.0, 0.1], 1, deadline_ms=15.0) == 0.1
    for _ in range(4):
        model.observe(0.1, batch=1, measured_ms=1.0)
    assert model.densest_within([1.0, 0.1], 1, deadline_ms=15.0) == 0.1  # still in the window
    model.observe(0.1, batch=1, measured_ms=1.0)
    assert model.slowdown == 1.0 and model.densest_within([1.0, 0.1], 1, deadline_ms=15.0) == 1.0


def test_predict_over_grpc_honours_the_deadline(agent: AgentServer, agent_stub, served) -> None:
    served.latency = LatencyModel({1.0: 1e6, 0.5: 1e6, 0.25: 1e6, 0.1: 1e-3})  # only 0.1 is fast enough
    _, request = _image()
    request.deadline_ms = 50.0
    assert agent_stub.Predict(request, timeout=10).density == 0.1
    request.deadline_ms = 0.0
    assert agent_stub.Predict(request, timeout=10).density == 1.0


def test_with_the_coordinator_unreachable_the_device_still_adapts_to_its_budget(served: ServedModel) -> None:
    """The agent decides from its own calibration before asking: a load spike moves it at once, and it keeps
    doing so while no coordinator answers (here: nothing listens on the port)."""
    clock = Clock()
    with grpc.insecure_channel(f"127.0.0.1:{pick_port()}") as channel:
        monitor = _monitor(pb_grpc.ControlPlaneStub(channel), served,
                           TraceBudget([TracePoint(0, LOOSE), TracePoint(10, TIGHT), TracePoint(20, LOOSE)], clock),
                           calibration=CALIBRATION, rpc_timeout=0.2)
        monitor.start()
        try:
            until(lambda: monitor.failures >= 1, timeout=5)
            assert served.state().density == 1.0
            clock.now = 10
            until(lambda: served.state().density == 0.25, timeout=5)  # TIGHT: 0.25 is the densest that fits
            clock.now = 20
            until(lambda: served.state().density == 1.0, timeout=5)
        finally:
            monitor.stop()
    assert monitor.density == 1.0  # the coordinator's last word never changed: only the device's own did


def test_the_device_never_serves_above_the_coordinators_answer(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    cheap = [CalibrationPoint(d, 1.0, 1.0) for d in (1.0, 0.5, 0.25, 0.1)]  # locally everything fits
    monitor = _monitor(stub, served, TraceBudget([TracePoint(0, TIGHT)]), calibration=cheap)
    monitor.heartbeat_now()
    assert monitor.local == 1.0 and monitor.density == 0.25  # the coordinator judges by the registered table
    assert served.state().density == 0.25


def test_what_predict_ran_reaches_the_registry_with_the_next_heartbeat(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    monitor = _monitor(stub, served, TraceBudget([TracePoint(0, LOOSE)]), usage=served.usage)
    x, _ = _image(batch=2)
    for _ in range(3):
        served.predict(x)
    monitor.heartbeat_now()
    [(density, (requests, busy_ms))] = coordinator.registry.served_totals(device_id).items()
    assert density == served.state().density and requests == 3 and busy_ms > 0
    monitor.heartbeat_now()  # nothing ran since: nothing new is reported
    assert coordinator.registry.served_totals(device_id)[density][0] == 3


def test_usage_a_failed_heartbeat_did_not_deliver_is_reported_later(served: ServedModel) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{pick_port()}") as channel:  # nobody listens
        monitor = _monitor(pb_grpc.ControlPlaneStub(channel), served, TraceBudget([TracePoint(0, LOOSE)]),
                           usage=served.usage, rpc_timeout=0.2)
        served.predict(_image()[0])
        with pytest.raises(grpc.RpcError):
            monitor.heartbeat_now()
    assert [requests for requests, _, _ in served.usage.take().values()] == [1]


# -- labelled checks of model versions (--check-set) -----------------------------------------------------------


def _checker(device: str = "pi-kitchen", examples: int = 64) -> VersionChecker:
    return VersionChecker(CheckSet.draw(load_dataset("fashion-mnist", "test"), examples, device))


def test_a_check_set_is_the_devices_own_and_the_same_on_every_start() -> None:
    split = load_dataset("fashion-mnist", "test")
    first, again, other = (CheckSet.draw(split, 64, name) for name in ("pi-kitchen", "pi-kitchen", "pi-garage"))
    assert len(first) == 64 and torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert unfit(split, ARCH) is None
    assert "images are [1, 28, 28]" in unfit(split, architecture("cnn", DENSITIES, "cifar10", 8))  # type: ignore[operator]


@pytest.mark.parametrize(("spec", "message"), [("", "DATASET"), (":5", "DATASET"), ("fashion-mnist:x", "whole"),
                                               ("fashion-mnist:0", "at least 1")])
def test_a_bad_check_set_says_what_is_expected(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_check_set(spec)
    assert parse_check_set("mnist") == ("mnist", DEFAULT_CHECK_EXAMPLES) and parse_check_set("mnist:9") == ("mnist", 9)


def test_each_version_is_checked_on_the_labelled_images_before_it_serves_and_the_registry_hears_it(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    checker = _checker()
    monitor = BudgetMonitor(stub, ARCH.densities, TraceBudget([TracePoint(0, LOOSE)]),
                            density=served.assigned_density, model_version=served.version,
                            on_density=served.set_density, checks=checker.ledger,
                            on_model_version=ModelUpdater(served, stub, fetch_level=LEVEL[1.0], checker=checker))
    trained = initial_model(ARCH)
    coordinator.publish("v1", trained)
    monitor.heartbeat_now()  # learns of v1: fetched, checked, then served
    assert served.version == "v1"
    dense = trained.to_dress().eval()  # the reference: the dense masked model the packed file was made from
    expected = {}
    with torch.no_grad():
        for density in ARCH.densities:
            dense.set_density(density)
            expected[density] = int((dense(checker.check_set.images).argmax(-1) == checker.check_set.labels).sum())
    monitor.heartbeat_now()  # reports the checks
    assert coordinator.registry.version_checks("v1") == {device_id: {d: (64, n) for d, n in expected.items()}}
    assert checker.ledger.take() == {}  # delivered once


def test_checks_a_failed_heartbeat_did_not_deliver_go_later_and_refused_ones_never_block_heartbeats(
    coordinator: Coordinator, stub: DeviceStub, device_id: int, served: ServedModel
) -> None:
    ledger = CheckLedger()
    coordinator.publish("v1", initial_model(ARCH))
    with grpc.insecure_channel(f"127.0.0.1:{pick_port()}") as channel:  # nobody listens
        down = BudgetMonitor(pb_grpc.ControlPlaneStub(channel), ARCH.densities, TraceBudget([TracePoint(0, LOOSE)]),
                             density=1.0, model_version="", on_density=served.set_density,
                             on_model_version=lambda v: None, checks=ledger, rpc_timeout=0.2)
        ledger.add({("v1", 1.0): (64, 50)})
        with pytest.raises(grpc.RpcError):
            down.heartbeat_now()
    monitor = _monitor(stub, served, TraceBudget([TracePoint(0, LOOSE)]), checks=ledger)
    ledger.add({("v9", 0.5): (64, 3)})  # a version this coordinator never published: the heartbeat is refused
    with pytest.raises(grpc.RpcError) as refused:
        monitor.heartbeat_now()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "never published" in refused.value.details()
    monitor.heartbeat_now()  # the checks went with the refusal; the device heartbeats on
    assert coordinator.registry.checked_accuracy(["v1", "v9"]) == {}  # one transaction: nothing of the refused one
    ledger.add({("v1", 1.0): (64, 50)})
    monitor.heartbeat_now()
    assert coordinator.registry.version_checks("v1") == {device_id: {1.0: (64, 50)}}
