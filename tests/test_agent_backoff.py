"""An agent's retries: exponential backoff with jitter and a cap, logged when the state changes, never per try.

The heartbeat (agent.monitor) and the model download (agent.model_fetch.ModelFollower) both retry with
agent.backoff.Backoff; test_fleet_bad_network.py checks the same across a real network that goes down.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time

import grpc
import pytest
from conftest import architecture, enrolled, until

from agent.backoff import Backoff
from agent.lifecycle import heartbeat_interval
from agent.model_fetch import ModelFetchError, ModelFollower
from agent.monitor import BudgetMonitor
from contracts.credentials import with_bearer
from contracts.policy import Budget
from coordinator.control_plane import serve
from coordinator.registry import Registry
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

DENSITIES = (0.1, 0.25, 0.5, 1.0)
ARCH = architecture("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 4)


def test_backoff_doubles_from_its_base_up_to_its_cap_with_jitter_below_each_step() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(0))
    assert backoff.delay() == 0.5  # nothing failed: the base period
    assert backoff.failed() and not backoff.failed()  # only the first failure in a row is news
    backoff.failures = 0
    for failures in range(1, 12):
        backoff.failed()
        step = min(0.5 * 2**failures, 8.0)
        for _ in range(50):
            assert 0.5 * step <= backoff.delay() <= step
    assert backoff.succeeded() == 11 and backoff.failures == 0 and backoff.delay() == 0.5
    assert backoff.succeeded() == 0


def test_backoff_keeps_the_cap_at_least_the_base_and_refuses_nonsense() -> None:
    assert Backoff(base=5.0, cap=1.0).cap == 5.0
    huge = Backoff(base=1.0, cap=60.0, jitter=0.0, failures=10_000)
    assert huge.delay() == 60.0  # no overflow, however long the outage
    for base, jitter in ((0.0, 0.5), (1.0, 1.0), (1.0, -0.1)):
        with pytest.raises(ValueError):
            Backoff(base=base, cap=10.0, jitter=jitter)


def test_a_fleet_backing_off_together_spreads_its_retries() -> None:
    """Jitter: devices that lost the coordinator at the same moment do not return to it in lockstep."""
    delays = []
    for seed in range(20):
        backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(seed))
        for _ in range(4):
            backoff.failed()
        delays.append(backoff.delay())
    assert max(delays) - min(delays) > 2.0 and all(8.0 <= d <= 16.0 for d in delays)


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses"


class FlakyStub:
    """A control plane that does not answer while ``down`` is set, and answers density 1 otherwise."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls = 0

    def Heartbeat(self, request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatResponse:
        self.calls += 1
        if self.down.is_set():
            raise Unreachable()
        return pb.HeartbeatResponse(level=3, model_version="")


class Steady:
    def current(self) -> Budget:
        return Budget(latency_ms=1000, memory_mb=100)


def test_heartbeats_back_off_while_the_coordinator_is_unreachable_and_log_once(
        caplog: pytest.LogCaptureFixture) -> None:
    stub = FlakyStub()
    monitor = BudgetMonitor(stub, DENSITIES, Steady(), density=1.0, model_version="",  # type: ignore[arg-type]
                            on_density=lambda assigned, local: assigned, on_model_version=lambda v: None,
                            interval=0.01, max_backoff=0.08)
    caplog.set_level(logging.INFO, logger="agent.monitor")
    monitor.start()
    try:
        until(lambda: stub.calls >= 3)
        stub.down.set()
        cut = time.monotonic()
        time.sleep(1.0)
        tries, seconds = stub.calls, time.monotonic() - cut
        assert monitor.failures >= 8
        # at 0.01 s a beat it would have tried ~100 times; backing off to 0.04..0.08 s, about 1/0.06 a second
        assert monitor.failures <= 8 + seconds / 0.04, (monitor.failures, seconds)
        stub.down.clear()
        until(lambda: monitor.failures == 0)
        assert stub.calls > tries
    finally:
        monitor.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "agent.monitor"]
    assert len([m for m in said if m.startswith("heartbeat failed")]) == 1, said
    assert len([m for m in said if "works again after" in m]) == 1, said


class Pacing:
    """A control plane that asks for a heartbeat every ``period`` seconds, as a large fleet's does."""

    def __init__(self, period: float) -> None:
        self.period, self.calls = period, 0

    def Heartbeat(self, request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatResponse:
        self.calls += 1
        return pb.HeartbeatResponse(level=3, model_version="", heartbeat_s=self.period)


@pytest.mark.parametrize("wanted", [None, 0.05])
def test_an_agent_heartbeats_as_often_as_the_coordinator_asks_or_its_own_shorter_wish(wanted: float | None) -> None:
    """Registered at 0.01 s, then told 0.3 s (the fleet grew): the agent slows to it, unless it asked for a
    shorter period itself (agent.lifecycle.heartbeat_interval)."""
    stub = Pacing(0.3)
    monitor = BudgetMonitor(stub, DENSITIES, Steady(), density=1.0, model_version="",  # type: ignore[arg-type]
                            on_density=lambda assigned, local: assigned, on_model_version=lambda v: None,
                            interval=0.01, pace=functools.partial(heartbeat_interval, wanted))
    monitor.start()
    try:
        until(lambda: stub.calls >= 1)
        time.sleep(0.9)
    finally:
        monitor.stop()
    assert monitor.interval == (wanted or 0.3)
    assert stub.calls <= (1 + 0.9 / 0.3 + 1 if wanted is None else 0.9 / 0.05 + 2), stub.calls


def test_a_model_download_never_holds_up_the_caller_and_retries_with_backoff(
        caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[tuple[str, float]] = []
    release, failing = threading.Event(), threading.Event()
    failing.set()

    def update(version: str) -> None:
        attempts.append((version, time.monotonic()))
        if version == "slow":
            release.wait(10)  # a download on a bad link
        if failing.is_set() and version != "slow":
            raise ModelFetchError("FetchModel up to level 3 failed: UNAVAILABLE: Socket closed")

    follower = ModelFollower(update, Backoff(base=0.02, cap=0.16))
    caplog.set_level(logging.INFO, logger="agent.model_fetch")
    follower.start()
    try:
        start = time.monotonic()
        follower("slow")  # the heartbeat announces a version: it returns at once
        assert time.monotonic() - start < 0.05
        until(lambda: attempts)
        follower("v2")  # announced while the download is in flight: fetched after it
        release.set()
        until(lambda: follower.backoff.failures >= 5)
        gaps = [b - a for (_, a), (_, b) in zip(attempts[1:], attempts[2:])]
        assert all(gap >= 0.009 for gap in gaps), gaps  # never back to back
        assert {v for v, _ in attempts[1:]} == {"v2"}  # the newest version announced is the one retried
        failing.clear()
        until(lambda: follower.served == "v2")
        settled = len(attempts)
        follower("v2")  # already served: nothing to do
        time.sleep(0.1)
        assert len(attempts) == settled
    finally:
        follower.stop()
    assert not follower.running
    said = [r.getMessage() for r in caplog.records if r.name == "agent.model_fetch"]
    assert len([m for m in said if m.startswith("cannot download")]) == 1, said
    assert len([m for m in said if "downloaded after" in m]) == 1, said


def test_a_device_whose_coordinator_returns_heartbeats_once_reconnected_not_after_its_backoff(
        sqlite_url: str, free_port: int) -> None:
    """The coordinator is down at the first heartbeat, so the next waits 5-10 s; it comes back 0.5 s later. gRPC
    reconnects on its own within a second or two, and the monitor, told so by the channel, heartbeats then."""
    address = f"127.0.0.1:{free_port}"
    points = [pb.CalibrationPoint(level=level, latency_ms=100 * d, memory_mb=800 * d)
              for level, d in enumerate(ARCH.densities)]
    with Registry(sqlite_url) as registry:
        server = serve(registry, "127.0.0.1", free_port, ARCH, lambda v, d, h: b"", heartbeat_s=5.0)
        with grpc.insecure_channel(address) as setup:
            device = enrolled(setup, registry, "pi")
            device.Register(pb.RegisterRequest(name="pi", profile="pi4", calibration=points))
        server.stop(grace=None).wait()
        channel = grpc.insecure_channel(address, options=[("grpc.max_reconnect_backoff_ms", 5_000)])
        stub = pb_grpc.ControlPlaneStub(with_bearer(channel, lambda: device.secret))
        monitor = BudgetMonitor(stub, ARCH.densities, Steady(), density=1.0, model_version="",
                                on_density=lambda assigned, local: assigned, on_model_version=lambda v: None,
                                interval=5.0, channel=channel)
        monitor.start()
        try:
            until(lambda: monitor.failures == 1)
            time.sleep(0.5)
            server = serve(registry, "127.0.0.1", free_port, ARCH, lambda v, d, h: b"", heartbeat_s=5.0)
            back = time.monotonic()
            until(lambda: monitor.failures == 0, timeout=10.0)
            assert time.monotonic() - back < 4.0  # its backoff alone would have waited 4.5 s at least
        finally:
            monitor.stop()
            channel.close()
            server.stop(grace=None).wait()
