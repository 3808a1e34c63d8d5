"""A fleet of virtual devices that talks to the control plane exactly as real agents do.

Each virtual device has a profile (from the device mix), a calibration (this machine's measured packed-model
cost scaled by the profile's relative speed) and a budget trace. One driver thread registers them all over
gRPC and heartbeats every online device each interval, so the registry fills as in deployment; a device in
an offline window of its trace stays silent and the coordinator marks it offline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from contracts.policy import CalibrationPoint
from contracts.naming import simulated_name
from contracts.profiles import Profile
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc
from simulations.traces import TracePoint, at, make_trace

log = logging.getLogger(__name__)


@dataclass
class VirtualDevice:
    name: str
    profile: Profile
    calibration: list[CalibrationPoint]
    trace: list[TracePoint]
    device_id: int = 0
    density: float = 0.0


def build_fleet(
    profiles: list[Profile], measured: list[CalibrationPoint], duration_s: float, seed: int, dropout: float
) -> list[VirtualDevice]:
    """One virtual device per profile entry; costs scale with 1/relative_speed (laptop-x86 = this machine)."""
    full = max(measured, key=lambda p: p.density)
    fleet = []
    for i, profile in enumerate(profiles):
        slow = 1.0 / profile.relative_speed
        calibration = [CalibrationPoint(p.density, p.latency_ms * slow, p.memory_mb) for p in measured]
        trace = make_trace(profile, full.latency_ms * slow, full.memory_mb, duration_s, seed * 7919 + i, dropout=dropout)
        fleet.append(VirtualDevice(simulated_name(i), profile, calibration, trace))
    return fleet


class FleetDriver:
    """Registers the virtual fleet, then heartbeats it from one thread until stopped."""

    def __init__(self, fleet: list[VirtualDevice], address: str, interval_s: float = 1.0) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ControlPlaneStub(self._channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-driver", daemon=True)
        self._started = 0.0

    def register(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        for device in self.fleet:
            reply = self._stub.Register(
                pb.RegisterRequest(
                    name=device.name,
                    profile=device.profile.name,
                    calibration=[
                        pb.CalibrationPoint(density=p.density, latency_ms=p.latency_ms, memory_mb=p.memory_mb)
                        for p in device.calibration
                    ],
                )
            )
            device.device_id, device.density = reply.device_id, reply.density

    @property
    def registered(self) -> list[int]:
        """Registry ids of the virtual devices that registered."""
        return [d.device_id for d in self.fleet if d.device_id]

    def start(self) -> None:
        self._started = time.monotonic()
        self.tick()
        self._thread.start()

    def tick(self) -> None:
        """One heartbeat from every device that is online at this point of its trace."""
        t = time.monotonic() - self._started
        for device in self.fleet:
            point = at(device.trace, t)
            if not point.online:
                continue
            budget = pb.Budget(latency_ms=point.latency_ms, memory_mb=point.memory_mb)
            if point.battery is not None:
                budget.battery = point.battery
            try:
                reply = self._stub.Heartbeat(pb.HeartbeatRequest(device_id=device.device_id, budget=budget), timeout=5)
                device.density = reply.density
            except grpc.RpcError as e:
                log.warning("heartbeat of %s failed: %s", device.name, e.details())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._channel.close()
