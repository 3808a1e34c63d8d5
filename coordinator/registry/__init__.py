"""Device registry: devices, budgets, density history, training rounds and model versions in SQL."""

from coordinator.registry.errors import DeviceNotFoundError, EnrollmentError, InvalidInputError
from coordinator.registry.migrate import upgrade
from coordinator.registry.models import AssignmentReason, DeviceStatus
from coordinator.registry.records import (
    Assignment,
    AssignmentRecord,
    DeviceInfo,
    Principal,
    RoundRecord,
    RoundUnderWay,
)
from coordinator.registry.repository import Registry

__all__ = [
    "Assignment",
    "AssignmentReason",
    "AssignmentRecord",
    "DeviceInfo",
    "DeviceNotFoundError",
    "DeviceStatus",
    "EnrollmentError",
    "InvalidInputError",
    "Principal",
    "Registry",
    "RoundRecord",
    "RoundUnderWay",
    "upgrade",
]
