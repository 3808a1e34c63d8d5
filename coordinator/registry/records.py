"""Plain values the registry hands out: detached from any session, safe to pass between threads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts.policy import Budget, CalibrationPoint
from coordinator.registry.models import AssignmentReason, DeviceStatus


@dataclass(frozen=True, slots=True)
class Assignment:
    """The density a device should run now, and whether this call changed it."""

    device_id: int
    density: float
    changed: bool
    model_version: str | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a presented secret proves the caller is: an enrolled device, or the holder of an unspent token."""

    name: str
    device_id: int | None  # None: an enrollment token, good for Describe and the one Register that spends it


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: int
    name: str
    profile: str
    flower_node_id: int | None
    status: DeviceStatus
    current_density: float
    first_seen: datetime
    last_seen: datetime  # latest heartbeat or (re-)registration
    last_budget: Budget | None
    calibration: tuple[CalibrationPoint, ...] = ()  # as registered, densest first
    model_version: str | None = None  # what its latest heartbeat said it serves, when that is the version it was given


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    """One row of a device's density history."""

    density: float
    reason: AssignmentReason
    budget: Budget | None  # the reported budget that caused it, for budget changes
    model_version: str | None
    assigned_at: datetime


@dataclass(frozen=True, slots=True)
class RoundRecord:
    round: int
    participants: dict[int, float]  # device id -> density it trained
    metrics: dict[float, dict[str, float]]  # density -> metric -> value
    bytes_sent: int
    bytes_received: int
    model_version: str | None
    recorded_at: datetime
    details: dict[str, Any]  # what the ServerApp recorded besides: participants by name, bytes, timings


@dataclass(frozen=True, slots=True)
class RoundUnderWay:
    """A round begun and not yet recorded: who it sent training to, and how long it waits for them."""

    round: int
    sent: dict[str, float]  # device name -> density
    timeout_s: float | None
    started_at: datetime
