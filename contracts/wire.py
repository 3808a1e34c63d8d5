"""The control plane's wire mapping, one function each way for every side: the architecture, and a calibration
whose points name their density by level (its index in the architecture's densities)."""

from __future__ import annotations

from collections.abc import Iterable

from contracts.policy import CalibrationPoint
from dress_model.models import Architecture
from dress_model.sparsity import check_level, level_of
from protos.dress.fleet.v1 import control_plane_pb2 as pb


def architecture_to_proto(arch: Architecture) -> pb.Architecture:
    return pb.Architecture(name=arch.name, densities=arch.densities, width=arch.width, in_channels=arch.in_channels,
                           num_classes=arch.num_classes, image_size=arch.image_size, bn_affine=arch.bn_affine)


def architecture_from_proto(message: pb.Architecture) -> Architecture:
    """ValueError (from Architecture's own checks) for an architecture this build cannot make."""
    return Architecture(name=message.name, densities=tuple(message.densities), width=message.width,
                        in_channels=message.in_channels, num_classes=message.num_classes,
                        image_size=message.image_size, bn_affine=message.bn_affine)  # type: ignore[arg-type]


def calibration_to_proto(points: Iterable[CalibrationPoint], densities: tuple[float, ...]) -> list[pb.CalibrationPoint]:
    return [pb.CalibrationPoint(level=level_of(densities, p.density), latency_ms=p.latency_ms, memory_mb=p.memory_mb,
                                train_ms=p.train_ms, train_memory_mb=p.train_memory_mb) for p in points]


def calibration_from_proto(points: Iterable[pb.CalibrationPoint],
                           densities: tuple[float, ...]) -> list[CalibrationPoint]:
    """ValueError for a level outside ``densities`` or numbers out of range (CalibrationPoint's checks)."""
    return [CalibrationPoint(densities[check_level(densities, p.level)], p.latency_ms, p.memory_mb, p.train_ms,
                             p.train_memory_mb) for p in points]
