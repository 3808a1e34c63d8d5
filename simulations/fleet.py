"""A fleet of virtual devices that talks to the control plane exactly as real agents do.

Each virtual device has a profile (from the device mix), a calibration (this machine's measured packed-model
cost scaled by the profile's relative speed) and a round-indexed budget trace. Budgets are profile-true: the
whole fleet serves one application deadline, set relative to the reference device (laptop-x86, this machine),
so a Pi 4 with all its CPU free still affords only what a Pi 4 can run in that time. One driver thread
registers the devices over gRPC, then heartbeats every online device each interval and whenever a round
completes, so the registry fills as in deployment; a device in an offline window of its trace stays silent
(and, as a real one, is marked offline once the coordinator has not heard from it for 6 heartbeat periods).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from contracts.credentials import bearer
from contracts.naming import simulated_name
from contracts.policy import Budget, CalibrationPoint
from contracts.profiles import Profile
from contracts.wire import calibration_to_proto
from dress_model.checkpoint import atomic_write
from dress_model.sparsity import density_at, level_of
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc
from simulations.traces import TracePoint, at

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class VirtualDevice:
    name: str
    profile: Profile
    calibration: list[CalibrationPoint]
    trace: list[TracePoint]
    device_id: int = 0
    credential: str = ""  # what its enrollment token bought at registration
    density: float = 0.0
    model_version: str = ""  # the version it was last given: a virtual device serves it at once (no download)
    last_beat: float = 0.0  # perf_counter when its last heartbeat left; 0 = none since it was last offline


def write_calibration(path: Path, model: str, measured: Sequence[CalibrationPoint]) -> None:
    """Save the calibration a fleet was built from, and of which ``model`` (``RunSettings.model_label``):
    ``simulate --calibration`` rebuilds the same fleet from it."""
    text = json.dumps({"model": model, "calibration": [dataclasses.asdict(p) for p in measured]}, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_calibration(path: Path, model: str, densities: Sequence[float]) -> list[CalibrationPoint]:
    """A calibration saved by ``write_calibration`` (a simulation's ``calibration.json``), checked: of the same
    ``model``, one point per density. ValueError names what is wrong."""
    try:
        saved = json.loads(path.read_text())
        points = [CalibrationPoint(**point) for point in saved["calibration"]]
        measured_on = str(saved["model"])
    except OSError as e:
        raise ValueError(f"--calibration {path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--calibration {path}: expected a simulation's calibration.json ({{\"model\", "
                         f"\"calibration\": [{{\"density\", \"latency_ms\", \"memory_mb\", \"train_ms\", "
                         f"\"train_memory_mb\"}}, ...]}}): {e}") from None
    if measured_on != model:
        raise ValueError(f"--calibration {path}: measured on {measured_on}, but this run trains {model}")
    def own(density: float) -> float | None:
        """The model's float for a density the file wrote, or None for one the model lacks."""
        try:
            return densities[level_of(densities, density)]
        except ValueError:
            return None

    mapped = [own(p.density) for p in points]
    if None in mapped or sorted(mapped) != sorted(densities):  # type: ignore[type-var]
        raise ValueError(f"--calibration {path}: measured densities {sorted(p.density for p in points)}, but the "
                         f"model has {sorted(densities)}")
    return sorted((dataclasses.replace(p, density=d) for p, d in zip(points, mapped)), key=lambda p: p.density,
                  reverse=True)


def build_fleet(
    profiles: list[Profile], measured: list[CalibrationPoint], traces: list[list[TracePoint]]
) -> list[VirtualDevice]:
    """One virtual device per profile entry; costs scale with 1/relative_speed (laptop-x86 = this machine)."""
    fleet = []
    for i, (profile, trace) in enumerate(zip(profiles, traces, strict=True)):
        slow = 1.0 / profile.relative_speed
        calibration = [CalibrationPoint(p.density, p.latency_ms * slow, p.memory_mb, p.train_ms * slow,
                                        p.train_memory_mb) for p in measured]
        fleet.append(VirtualDevice(simulated_name(i), profile, calibration, trace))
    return fleet


def fleet_deadline_ms(measured: list[CalibrationPoint], headroom: float) -> float:
    """The fleet's latency deadline: ``headroom`` times the full model's latency on this (reference) machine."""
    return max(measured, key=lambda p: p.density).latency_ms * headroom


def device_budget(profile: Profile, point: TracePoint, deadline_ms: float) -> Budget:
    """What a device affords at one trace point: the deadline scaled by its free CPU share, its own free memory.

    The deadline is common to the fleet, and the device's calibration already carries its speed, so the policy
    gives a fast device a dense subnet and a slow one a sparse subnet for the same deadline.
    """
    return Budget(latency_ms=deadline_ms * point.available, memory_mb=profile.memory_mb * point.memory_share,
                  battery=point.battery if profile.battery else None)


def heartbeats(
    fleet: list[VirtualDevice], point: int, deadline_ms: float
) -> list[tuple[VirtualDevice, Budget]]:
    """The budget each online device reports at trace ``point`` (what round ``point + 1`` samples)."""
    beats = []
    for device in fleet:
        here = at(device.trace, point)
        if here.online:
            beats.append((device, device_budget(device.profile, here, deadline_ms)))
    return beats


@dataclass
class HeartbeatStats:
    """What the control plane made of the fleet's heartbeats: answered, lost, how long each took, and the gaps
    between one online device's consecutive heartbeats — the control plane keeps up when no gap exceeds the
    heartbeat period (a slow answer holds up the sweep, so the next heartbeats leave late)."""

    latencies_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    lost: int = 0
    started: float = field(default_factory=time.perf_counter)

    def record(self, latency_s: float) -> None:
        self.latencies_s.append(latency_s)

    def summary(self) -> dict[str, float]:
        answered, gaps = sorted(self.latencies_s), sorted(self.gaps_s)
        elapsed = time.perf_counter() - self.started
        return {"answered": len(answered), "lost": self.lost,
                "per_s": round(len(answered) / elapsed, 1) if elapsed > 0 else 0.0,
                "p50_ms": round(1000 * _quantile(answered, 0.50), 2), "p99_ms": round(1000 * _quantile(answered, 0.99), 2),
                "p99_gap_s": round(_quantile(gaps, 0.99), 2), "max_gap_s": round(gaps[-1] if gaps else 0.0, 2)}


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class FleetDriver:
    """Registers the virtual fleet, then heartbeats it from one thread until stopped.

    It ticks on every change of ``started_rounds()`` (polled every ``poll_s``) and every ``interval_s`` so
    devices stay fresh. Trace point r is heartbeated as soon as round r has begun, while its devices train, so
    it is in the registry long before round r+1 samples it, whatever this machine's speed or load.
    """

    def __init__(
        self,
        fleet: list[VirtualDevice],
        densities: tuple[float, ...],
        address: str,
        started_rounds: Callable[[], int],
        deadline_ms: float,
        interval_s: float = 1.0,
        poll_s: float = 0.2,
        in_flight: int = 64,
    ) -> None:
        self.fleet = fleet
        self.densities = densities  # the model's: the control plane names a density by its level in them
        self.in_flight = in_flight
        self.stats = HeartbeatStats()
        self.deadline_ms = deadline_ms
        self.interval_s = interval_s
        self.poll_s = poll_s
        self._started_rounds = started_rounds
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ControlPlaneStub(self._channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-driver", daemon=True)
        self._applied = -1  # the trace point last heartbeated
        self._last_beat = 0.0

    def register(self, tokens: Mapping[str, str], timeout_s: float = 30.0) -> None:
        """Register every device with its enrollment token (``tokens``: name -> token), ``in_flight`` at a time,
        as real agents join; a refused registration is an error."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

        def call(device: VirtualDevice) -> grpc.Future:
            return self._stub.Register.future(pb.RegisterRequest(
                name=device.name,
                profile=device.profile.name,
                calibration=calibration_to_proto(device.calibration, self.densities),
            ), timeout=timeout_s, metadata=bearer(tokens[device.name]))

        def settle(device: VirtualDevice, future: grpc.Future, sent: float) -> None:
            reply = future.result()
            device.device_id, device.credential = reply.device_id, reply.credential
            device.density = density_at(self.densities, reply.level)
            self._follow(reply.heartbeat_s)

        self._concurrently(self.fleet, call, settle)

    @property
    def registered(self) -> list[int]:
        """Registry ids of the virtual devices that registered."""
        return [d.device_id for d in self.fleet if d.device_id]

    def start(self) -> None:
        """Heartbeats the current trace point (0 before the run) before returning, so round 1 already samples it."""
        self.tick(self._started_rounds())
        self._thread.start()

    def tick(self, point: int) -> None:
        """One heartbeat from every device that is online at this round's point of its trace.

        Up to ``in_flight`` heartbeats travel at once, as independent devices' would; each one's latency and
        every failure are counted (``stats``), so a report can say whether the control plane kept up."""
        def call(beat: tuple[VirtualDevice, Budget]) -> grpc.Future:
            device, budget = beat
            now = time.perf_counter()
            if device.last_beat:
                self.stats.gaps_s.append(now - device.last_beat)
            device.last_beat = now
            message = pb.Budget(latency_ms=budget.latency_ms, memory_mb=budget.memory_mb)
            if budget.battery is not None:
                message.battery = budget.battery
            return self._stub.Heartbeat.future(pb.HeartbeatRequest(budget=message, model_version=device.model_version),
                                               timeout=30, metadata=bearer(device.credential))

        def settle(beat: tuple[VirtualDevice, Budget], future: grpc.Future, sent: float) -> None:
            device = beat[0]
            try:
                reply = future.result()
                device.density, device.model_version = density_at(self.densities, reply.level), reply.model_version
                self._follow(reply.heartbeat_s)
                self.stats.record(time.perf_counter() - sent)
            except grpc.RpcError as e:
                self.stats.lost += 1
                log.warning("heartbeat of %s failed: %s", device.name, e.details())

        started = time.monotonic()
        beats = heartbeats(self.fleet, point, self.deadline_ms)
        online = {id(device) for device, _ in beats}
        for device in self.fleet:
            if id(device) not in online:  # silent by its trace: its next heartbeat starts a new series
                device.last_beat = 0.0
        self._concurrently(beats, call, settle)
        # The period runs from the start of a sweep, so a device heartbeats every interval_s as long as a sweep
        # of the fleet takes less than that.
        self._applied, self._last_beat = point, started

    def _follow(self, asked_s: float) -> None:
        """Heartbeat as often as the coordinator asks, as agents do: its period grows with the fleet."""
        if asked_s > 0 and asked_s != self.interval_s:
            log.info("the fleet heartbeats every %g s: the coordinator asks for it", asked_s)
            self.interval_s = asked_s

    def _concurrently(self, items: list[T], call: Callable[[T], grpc.Future],
                      settle: Callable[[T, grpc.Future, float], None]) -> None:
        """``call`` for every item with at most ``in_flight`` answers outstanding; ``settle`` each answer in
        order with the time its call was sent."""
        pending: deque[tuple[T, grpc.Future, float]] = deque()
        for item in items:
            sent = time.perf_counter()
            pending.append((item, call(item), sent))
            if len(pending) >= self.in_flight:
                settle(*pending.popleft())
        while pending:
            settle(*pending.popleft())

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            point = self._started_rounds()
            if point != self._applied or time.monotonic() - self._last_beat >= self.interval_s:
                self.tick(point)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._channel.close()
