"""A calibration on the wire: ``CalibrationPoint`` <-> its protobuf message, one mapping for every side."""

from __future__ import annotations

from collections.abc import Iterable

from contracts.policy import CalibrationPoint
from protos.dress.fleet.v1 import control_plane_pb2 as pb


def to_proto(points: Iterable[CalibrationPoint]) -> list[pb.CalibrationPoint]:
    return [pb.CalibrationPoint(density=p.density, latency_ms=p.latency_ms, memory_mb=p.memory_mb,
                                train_ms=p.train_ms, train_memory_mb=p.train_memory_mb) for p in points]


def from_proto(points: Iterable[pb.CalibrationPoint]) -> list[CalibrationPoint]:
    """ValueError (from CalibrationPoint) for a point whose numbers are out of range."""
    return [CalibrationPoint(p.density, p.latency_ms, p.memory_mb, p.train_ms, p.train_memory_mb) for p in points]
