"""The control plane's wire mapping, one function each way for every side: the architecture, and a calibration
whose points name their density by level (its index in the architecture's densities)."""

from __future__ import annotations

from collections.abc import Iterable

from contracts.policy import CalibrationPoint
from dress_model.models import Architecture
from dress_model.sparsity import density_at, level_of
from protos.dress.fleet.v1 import control_plane_pb2 as pb

KEEPALIVE_PING_MS = 10_000
"""An agent pings the coordinator this often, idle or not, to find a dead network fast."""
AGENT_KEEPALIVE = [("grpc.keepalive_time_ms", KEEPALIVE_PING_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_PING_MS // 2),
                   ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
"""An agent's channel options: a ping unanswered within half the period counts the connection dead."""
CONTROL_PLANE_KEEPALIVE = [("grpc.keepalive_permit_without_calls", 1),
                           ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_PING_MS // 2)]
"""The control plane's server options: it accepts the agents' pings (gRPC's default answers pings more often than
every 5 minutes with GOAWAY), with room for a ping that leaves early."""


def architecture_to_proto(arch: Architecture) -> pb.Architecture:
    """The message holds the dataclass's fields under their own names."""
    return pb.Architecture(**arch.to_json())


def architecture_from_proto(message: pb.Architecture) -> Architecture:
    """ValueError (from Architecture's own checks) for an architecture this build cannot make."""
    fields = {name: getattr(message, name) for name in Architecture.__dataclass_fields__}
    return Architecture.from_json({**fields, "densities": list(message.densities)})


def calibration_to_proto(points: Iterable[CalibrationPoint], densities: tuple[float, ...]) -> list[pb.CalibrationPoint]:
    return [pb.CalibrationPoint(level=level_of(densities, p.density), latency_ms=p.latency_ms, memory_mb=p.memory_mb,
                                train_ms=p.train_ms, train_memory_mb=p.train_memory_mb) for p in points]


def calibration_from_proto(points: Iterable[pb.CalibrationPoint],
                           densities: tuple[float, ...]) -> list[CalibrationPoint]:
    """ValueError for a level outside ``densities`` or numbers out of range (CalibrationPoint's checks)."""
    return [CalibrationPoint(density_at(densities, p.level), p.latency_ms, p.memory_mb, p.train_ms, p.train_memory_mb)
            for p in points]
