"""Control plane over real gRPC on loopback: the happy paths, every bad input's status code, and strangers."""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import DeviceStub, architecture, enrolled
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contracts.policy import CalibrationPoint
from contracts.settings import HEARTBEATS_PER_S, heartbeat_period_s
from contracts.wire import architecture_to_proto
from coordinator.control_plane import SERVICE_NAME, serve
from coordinator.registry import AssignmentReason, Registry
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

CHUNK_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 32 * 1024
ARCH = architecture("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 16)
ARCHITECTURE = architecture_to_proto(ARCH)
LEVEL = {d: level for level, d in enumerate(ARCH.densities)}  # a density crosses the wire as its level
CALIBRATION = [pb.CalibrationPoint(level=LEVEL[d], latency_ms=100 * d, memory_mb=800 * d) for d in (1.0, 0.5, 0.25, 0.1)]


HEARTBEAT_S = 7.5


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Packed models on disk, one file per density (0.1 deliberately missing)."""
    directory = tmp_path / "models"
    directory.mkdir()
    rng = random.Random(7)
    for density in (1.0, 0.5, 0.25):
        (directory / f"model-{density:g}.bin").write_bytes(rng.randbytes(int(300_000 * density)))
    return directory


@pytest.fixture
def registry(sqlite_url: str) -> Iterator[Registry]:
    with Registry(sqlite_url) as registry:
        yield registry


@pytest.fixture
def channel(registry: Registry, model_dir: Path, free_port: int) -> Iterator[grpc.Channel]:
    def provider(version: str, density: float, half: bool) -> bytes:
        path = model_dir / f"model-{density:g}.bin"
        if not path.exists():
            raise LookupError(f"{path.name} not packed yet")
        return path.read_bytes()

    server = serve(registry, "127.0.0.1", free_port, ARCH, provider, max_workers=8,
                   max_message_bytes=MAX_MESSAGE_BYTES, chunk_bytes=CHUNK_BYTES, heartbeat_s=HEARTBEAT_S)
    with grpc.insecure_channel(f"127.0.0.1:{free_port}") as channel:
        yield channel
    server.stop(grace=None).wait()


@pytest.fixture
def enroll(channel: grpc.Channel, registry: Registry) -> Callable[[str], DeviceStub]:
    return lambda name: enrolled(channel, registry, name)


@pytest.fixture
def stub(enroll: Callable[[str], DeviceStub]) -> DeviceStub:
    """Device pi-kitchen, enrolled (token in hand) and, once ``device_id`` is asked for, registered."""
    return enroll("pi-kitchen")


@pytest.fixture
def device_id(stub: DeviceStub) -> int:
    return stub.Register(pb.RegisterRequest(name="pi-kitchen", profile="pi4", calibration=CALIBRATION)).device_id


def _budget(latency_ms: float, memory_mb: float, battery: float | None = None) -> pb.Budget:
    return pb.Budget(latency_ms=latency_ms, memory_mb=memory_mb, battery=battery)


def _status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# -- happy paths -------------------------------------------------------------------------------------------


def test_health_service_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_register_assigns_density_from_profile(enroll: Callable[[str], DeviceStub], registry: Registry) -> None:
    stub = enroll("phone-1")
    reply = stub.Register(pb.RegisterRequest(name="phone-1", profile="phone", calibration=CALIBRATION))
    # phone's tightest typical budget is 30 ms / 128 MB: 0.1 is the densest that fits
    assert reply.level == LEVEL[0.1] and reply.device_id > 0 and reply.model_version == ""
    assert reply.architecture == ARCHITECTURE  # what the device was registered to run
    assert reply.heartbeat_s == HEARTBEAT_S  # and how often to report its budget
    again = stub.Register(pb.RegisterRequest(name="phone-1", profile="phone", calibration=CALIBRATION))
    assert again.device_id == reply.device_id
    [device] = registry.list_devices()
    assert device.name == "phone-1"


def test_describe_names_the_fleets_architecture(stub: DeviceStub, registry: Registry) -> None:
    assert stub.Describe(pb.DescribeRequest()).architecture == ARCHITECTURE
    registry.add_model_version("v1", "/ckpt/v1", [1.0, 0.5, 0.25, 0.1])
    assert stub.Describe(pb.DescribeRequest()).model_version == "v1"


@pytest.mark.parametrize(("levels", "message"), [((3, 2), "every level 0-3"), ((3, 2, 1, 4), "level must be an "
                                                                                               "integer in [0, 3]")])
def test_calibration_for_another_architecture_is_refused(enroll: Callable[[str], DeviceStub], registry: Registry,
                                                         levels: tuple[int, ...], message: str) -> None:
    stub = enroll("x")
    points = [pb.CalibrationPoint(level=level, latency_ms=10, memory_mb=10) for level in levels]
    code, details = _status(lambda: stub.Register(pb.RegisterRequest(name="x", profile="pi4", calibration=points)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    assert registry.list_devices() == []


def test_heartbeat_budget_change_changes_density_and_records_history(
    stub: DeviceStub, registry: Registry, device_id: int
) -> None:
    registry.add_model_version("v3", "/ckpt/v3.safetensors", [1.0, 0.5, 0.25, 0.1])
    answers = [
        stub.Heartbeat(pb.HeartbeatRequest(budget=_budget(*budget)))
        for budget in [(200, 2000, 0.9), (200, 2000, 0.8), (60, 2000, 0.5), (30, 300)]
    ]
    assert [(ARCH.densities[a.level], a.changed) for a in answers] == [(1.0, True), (1.0, False), (0.5, True), (0.25, True)]
    assert {a.model_version for a in answers} == {"v3"}
    assert {a.heartbeat_s for a in answers} == {HEARTBEAT_S}
    assert registry.get_device(device_id).current_density == 0.25
    history = registry.device_history(device_id)
    assert [(h.density, h.reason) for h in history] == [
        (0.25, AssignmentReason.REGISTRATION),
        (1.0, AssignmentReason.BUDGET_CHANGE),
        (0.5, AssignmentReason.BUDGET_CHANGE),
        (0.25, AssignmentReason.BUDGET_CHANGE),
    ]
    assert history[2].budget is not None and (history[2].budget.latency_ms, history[2].budget.battery) == (60, 0.5)
    assert history[3].budget is not None and history[3].budget.battery is None
    assert history[1].model_version == "v3"


def test_fetch_model_streams_the_file_in_chunks(stub: DeviceStub, device_id: int,
                                                model_dir: Path, registry: Registry) -> None:
    registry.add_model_version("v1", "/ckpt/v1", [1.0, 0.5])
    expected = (model_dir / "model-1.bin").read_bytes()
    chunks = list(stub.FetchModel(pb.FetchModelRequest(level=LEVEL[1.0])))
    assert len(chunks) == math.ceil(len(expected) / CHUNK_BYTES) > 1
    assert [c.offset for c in chunks] == [i * CHUNK_BYTES for i in range(len(chunks))]
    assert b"".join(c.data for c in chunks) == expected
    assert {(c.total_size, c.sha256, c.model_version, c.level) for c in chunks} == {
        (len(expected), hashlib.sha256(expected).hexdigest(), "v1", LEVEL[1.0])
    }


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (_budget(-1, 500), "latency_ms"),
        (_budget(0, 500), "latency_ms"),
        (_budget(50, 0), "memory_mb"),
        (_budget(50, float("nan")), "memory_mb"),
        (_budget(50, 500, 1.5), "battery"),
        (_budget(1e12, 500), "latency_ms"),
        (None, "no budget"),
    ],
)
def test_budget_out_of_range_is_invalid_argument(stub: DeviceStub, registry: Registry,
                                                 device_id: int, budget: pb.Budget | None, message: str) -> None:
    code, details = _status(lambda: stub.Heartbeat(pb.HeartbeatRequest(budget=budget)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert registry.list_devices()[0].last_budget is None  # nothing recorded


@pytest.mark.parametrize(("checks", "message"), [
    ([pb.VersionCheck(model_version="v1", level=3, examples=64, correct=9)] * 2, "more than once"),
    ([pb.VersionCheck(model_version="v1", level=9, examples=64, correct=9)], "level"),
    ([pb.VersionCheck(model_version="v1", level=3, examples=64, correct=65)], "correct must be"),
])
def test_a_heartbeats_version_checks_are_checked_before_anything_is_recorded(
        stub: DeviceStub, registry: Registry, device_id: int, checks: list[pb.VersionCheck], message: str) -> None:
    registry.add_model_version("v1", "/m/v1", (1.0, 0.5, 0.25, 0.1))
    code, details = _status(lambda: stub.Heartbeat(pb.HeartbeatRequest(budget=_budget(50, 500), checks=checks)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert registry.list_devices()[0].last_budget is None and registry.version_checks("v1") == {}


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ([], "calibration is empty"),
        ([pb.CalibrationPoint(level=4, latency_ms=1, memory_mb=1)], "level must be an integer in [0, 3]"),
        ([pb.CalibrationPoint(level=2**31, latency_ms=1, memory_mb=1)], "level must be an integer in [0, 3]"),
        ([pb.CalibrationPoint(level=2, latency_ms=1, memory_mb=1)] * 2, "density 0.5 more than once"),
        ([pb.CalibrationPoint(level=2, latency_ms=-3, memory_mb=1)], "latency_ms"),
        ([pb.CalibrationPoint(level=2, latency_ms=3, memory_mb=-1)], "memory_mb"),
    ],
)
def test_malformed_calibration_is_invalid_argument(enroll: Callable[[str], DeviceStub], registry: Registry,
                                                   calibration: list[pb.CalibrationPoint], message: str) -> None:
    stub = enroll("pi")
    code, details = _status(lambda: stub.Register(pb.RegisterRequest(name="pi", profile="pi4",
                                                                     calibration=calibration)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert registry.list_devices() == []


def test_unknown_profile_is_invalid_argument_listing_profiles(enroll: Callable[[str], DeviceStub],
                                                              registry: Registry) -> None:
    stub = enroll("x")
    code, details = _status(lambda: stub.Register(pb.RegisterRequest(name="x", profile="pi3",
                                                                     calibration=CALIBRATION)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'pi3'" in details and "jetson-orin-nano" in details and "pi5" in details
    assert registry.list_devices() == []


@pytest.mark.parametrize("name", ["   ", "x" * 129, "evil[/oops]", "a\x00b"])
def test_a_bad_device_name_cannot_be_enrolled(registry: Registry, name: str) -> None:
    with pytest.raises(ValueError, match="device name"):
        registry.enroll([name])
    assert registry.list_devices() == []


def test_oversized_message_is_resource_exhausted(enroll: Callable[[str], DeviceStub], registry: Registry) -> None:
    stub = enroll("big")
    huge = pb.RegisterRequest(name="big", profile="pi4", calibration=CALIBRATION * 1000)
    assert huge.ByteSize() > MAX_MESSAGE_BYTES
    code, details = _status(lambda: stub.Register(huge))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    assert registry.list_devices() == []


def test_fetch_model_at_a_level_the_model_lacks_is_invalid_argument(stub: DeviceStub, device_id: int) -> None:
    code, details = _status(lambda: list(stub.FetchModel(pb.FetchModelRequest(level=4))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "level must be an integer in [0, 3] (densities 1,0.5,0.25,0.1, sparsest first), got 4" in details


def test_fetch_model_not_packed_is_not_found(stub: DeviceStub, device_id: int) -> None:
    code, details = _status(lambda: list(stub.FetchModel(pb.FetchModelRequest(level=LEVEL[0.1]))))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no packed model at density 0.1" in details


def test_concurrent_downloads_are_capped(registry: Registry, free_port: int) -> None:
    """With one download slot, a second FetchModel is refused while the first streams, then works."""
    entered, release = threading.Event(), threading.Event()

    def slow_provider(version: str, density: float, half: bool) -> bytes:
        entered.set()
        release.wait(timeout=10)
        return b"weights" * 1000

    server = serve(registry, "127.0.0.1", free_port, ARCH, slow_provider, max_workers=4, max_fetches=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{free_port}") as channel:
            stub = enrolled(channel, registry, "pi")
            stub.Register(pb.RegisterRequest(name="pi", profile="pi4", calibration=CALIBRATION))
            request = pb.FetchModelRequest(level=LEVEL[0.5])
            results: list[bytes] = []
            downloader = threading.Thread(target=lambda: results.append(
                b"".join(c.data for c in stub.FetchModel(request))))
            downloader.start()
            assert entered.wait(timeout=10)
            code, details = _status(lambda: list(stub.FetchModel(request)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in details
            # heartbeats still get a thread
            assert stub.Heartbeat(pb.HeartbeatRequest(budget=_budget(60, 500))).level == LEVEL[0.5]
            release.set()
            downloader.join(timeout=10)
            assert results == [b"weights" * 1000]
            assert b"".join(c.data for c in stub.FetchModel(request)) == b"weights" * 1000  # the slot is free again
    finally:
        release.set()
        server.stop(grace=None).wait()


def test_a_fleet_too_large_for_the_heartbeat_setting_is_told_a_longer_period(registry: Registry,
                                                                              free_port: int) -> None:
    """At 0.01 s, two devices would already send more than HEARTBEATS_PER_S: 40 registered devices are told
    40 / HEARTBEATS_PER_S, so the fleet sends HEARTBEATS_PER_S heartbeats a second, not 4,000."""
    points = [CalibrationPoint(d, 100 * d, 800 * d) for d in ARCH.densities]
    for name, token in registry.enroll([f"pi-{i}" for i in range(39)]).items():
        registry.enroll_device(token, name, "pi4", points)
    server = serve(registry, "127.0.0.1", free_port, ARCH, lambda v, d, h: b"", heartbeat_s=0.01)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{free_port}") as channel:
            stub = enrolled(channel, registry, "pi-last")
            told = stub.Register(pb.RegisterRequest(name="pi-last", profile="pi4", calibration=CALIBRATION)).heartbeat_s
            assert told == pytest.approx(heartbeat_period_s(0.01, 40)) == pytest.approx(40 / HEARTBEATS_PER_S)
            assert stub.Heartbeat(pb.HeartbeatRequest(budget=_budget(60, 500))).heartbeat_s == pytest.approx(told)
    finally:
        server.stop(grace=None).wait()


@pytest.mark.parametrize("method", ["Describe", "Register", "Heartbeat", "FetchModel"])
def test_a_request_that_is_not_protobuf_is_invalid_argument_without_an_error_log(
    channel: grpc.Channel, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage bytes from anyone must not fill the log with tracebacks (grpc logs an ERROR when it parses them)."""
    path = f"/{SERVICE_NAME}/{method}"
    call = (channel.unary_stream(path) if method == "FetchModel" else channel.unary_unary(path))
    garbage = b"\xff\xff\xff\xff\x0f"  # a field key no message has, then a truncated varint
    with caplog.at_level("DEBUG"):
        code, details = _status(lambda: list(call(garbage, timeout=5)) if method == "FetchModel" else call(garbage, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in details
    assert not [r for r in caplog.records if r.levelno >= 30]


# -- strangers ---------------------------------------------------------------------------------------------

CALLS: dict[str, Callable[[pb_grpc.ControlPlaneStub], object]] = {
    "Describe": lambda stub: stub.Describe(pb.DescribeRequest(), timeout=5),
    "Register": lambda stub: stub.Register(
        pb.RegisterRequest(name="pi-kitchen", profile="pi4", calibration=CALIBRATION), timeout=5),
    "Heartbeat": lambda stub: stub.Heartbeat(pb.HeartbeatRequest(budget=_budget(500, 5000)), timeout=5),
    "FetchModel": lambda stub: list(stub.FetchModel(pb.FetchModelRequest(level=LEVEL[1.0]), timeout=5)),
}


@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("secret", [None, "", "dfd_forged", "dfe_forged", "not-even-a-prefix", "x" * 500])
def test_a_stranger_is_unauthenticated_and_changes_nothing(channel: grpc.Channel, registry: Registry,
                                                           device_id: int, method: str, secret: str | None) -> None:
    before = registry.list_devices()
    code, details = _status(lambda: CALLS[method](DeviceStub(channel, secret)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "enroll" in details
    assert registry.list_devices() == before and registry.device_history(device_id)[-1].budget is None


def test_an_enrollment_token_registers_once(channel: grpc.Channel, registry: Registry) -> None:
    token = registry.enroll(["pi-kitchen"])["pi-kitchen"]
    first = DeviceStub(channel, token)
    reply = first.Register(pb.RegisterRequest(profile="pi4", calibration=CALIBRATION))  # no name: the token's
    assert reply.name == "pi-kitchen" and reply.credential.startswith("dfd_") and first.secret == reply.credential
    code, _ = _status(lambda: DeviceStub(channel, token).Register(
        pb.RegisterRequest(name="pi-kitchen", profile="pi4", calibration=CALIBRATION)))
    assert code == grpc.StatusCode.UNAUTHENTICATED  # spent: a second device cannot take the name with it
    again = first.Register(pb.RegisterRequest(name="pi-kitchen", profile="pi4", calibration=CALIBRATION))
    assert again.device_id == reply.device_id and again.credential == ""  # a restart: same id, no new secret


def test_a_token_only_describes_and_registers_as_its_name(enroll: Callable[[str], DeviceStub],
                                                          registry: Registry) -> None:
    stub = enroll("pi-kitchen")
    assert stub.Describe(pb.DescribeRequest()).architecture == ARCHITECTURE
    code, details = _status(lambda: stub.Register(pb.RegisterRequest(name="pi-garage", profile="pi4",
                                                                     calibration=CALIBRATION)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "pi-kitchen" in details
    for method in ("Heartbeat", "FetchModel"):
        code, details = _status(lambda: CALLS[method](stub))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "register first" in details
    assert registry.list_devices() == []


def test_an_expired_token_is_refused(channel: grpc.Channel, registry: Registry) -> None:
    from datetime import timedelta
    token = registry.enroll(["pi-kitchen"], ttl=timedelta(microseconds=1))["pi-kitchen"]
    code, _ = _status(lambda: CALLS["Register"](DeviceStub(channel, token)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and registry.list_devices() == []


def test_a_device_acts_only_as_itself(enroll: Callable[[str], DeviceStub], stub: DeviceStub, device_id: int,
                                      registry: Registry) -> None:
    """No request names a device: whatever a caller sends acts on the device its credential proves."""
    mallory = enroll("mallory")
    mallory_id = mallory.Register(pb.RegisterRequest(name="mallory", profile="laptop-x86",
                                                     calibration=CALIBRATION)).device_id
    victim = registry.get_device(device_id)
    assert CALLS["Heartbeat"](mallory).level == LEVEL[1.0]
    assert registry.get_device(mallory_id).last_budget is not None
    code, details = _status(lambda: CALLS["Register"](mallory))  # re-register under the victim's name
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'mallory', not 'pi-kitchen'" in details
    assert registry.get_device(device_id) == victim and len(registry.device_history(device_id)) == 1
    assert CALLS["Heartbeat"](stub).level == LEVEL[1.0]  # the victim itself carries on


def test_re_enrolling_a_name_revokes_the_old_credential(channel: grpc.Channel, stub: DeviceStub, device_id: int,
                                                        registry: Registry) -> None:
    old = stub.secret
    assert old is not None and registry.authenticate(old) is not None
    replacement = enrolled(channel, registry, "pi-kitchen")
    reply = replacement.Register(pb.RegisterRequest(profile="pi4", calibration=CALIBRATION))
    assert reply.device_id == device_id and reply.credential != old  # same device, new holder
    assert registry.authenticate(old) is None


def test_ids_are_not_sequential_and_secrets_are_stored_only_as_digests(
    enroll: Callable[[str], DeviceStub], registry: Registry, sqlite_url: str
) -> None:
    stubs = [enroll(f"pi-{i}") for i in range(6)]
    tokens = [s.secret for s in stubs]
    ids = [s.Register(pb.RegisterRequest(profile="pi4", calibration=CALIBRATION)).device_id for s in stubs]
    assert len(set(ids)) == 6 and sorted(ids) != list(range(min(ids), min(ids) + 6))
    stored = Path(sqlite_url.removeprefix("sqlite:///")).read_bytes()
    for secret in [*tokens, *(s.secret for s in stubs)]:
        assert secret is not None and secret.encode() not in stored
