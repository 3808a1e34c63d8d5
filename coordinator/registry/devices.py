"""Devices: registration, heartbeats with the density policy inside the transaction, assignments, status,
what they served, their history.

Writers lock the device row (SELECT ... FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) before
reading its current density, so concurrent heartbeats for one device never lose an update.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from contracts.naming import check_name
from contracts.policy import Budget, CalibrationPoint, choose_density, validate_calibration
from contracts.profiles import UnknownProfileError, get_profile
from coordinator.registry.errors import DeviceNotFoundError, InvalidInputError
from coordinator.registry.models import (
    AssignmentReason,
    BudgetReport,
    DensityAssignment,
    Device,
    DeviceStatus,
    ModelVersion,
    VersionCheck,
)
from coordinator.registry.records import Assignment, AssignmentRecord, DeviceInfo
from coordinator.registry.rollouts import current_rollout, serving_version, version_in
from coordinator.registry.store import MAX_METRICS, MAX_NAME_LENGTH, Store, T, check_density, utc_now

log = logging.getLogger(__name__)


DEVICE_ID_LIMIT = 2**31  # devices.id is a 32-bit INTEGER on PostgreSQL
_EXPLICIT_REASONS = (AssignmentReason.OPERATOR, AssignmentReason.TRAINING_ASSIGNMENT)
_LATEST_BUDGET_ID = (
    select(func.max(BudgetReport.id)).where(BudgetReport.device_id == Device.id).correlate(Device).scalar_subquery()
)

# The heartbeat path runs ~1,000 times a second: its statements are built once, with bind parameters,
# so each call skips statement construction and cache-key generation (half its CPU time otherwise).
_devices, _budgets, _assignments = Device.__table__, BudgetReport.__table__, DensityAssignment.__table__
_LOCK_DEVICE = (
    select(_devices.c.current_density, _devices.c.calibration, _devices.c.status, _devices.c.name)
    .where(_devices.c.id == bindparam("device_id"))
    .with_for_update(of=_devices)
)
_INSERT_BUDGET = insert(_budgets).returning(_budgets.c.id)
_INSERT_ASSIGNMENT = insert(_assignments)
_SET_DEVICE_STATE = (
    update(_devices)
    .where(_devices.c.id == bindparam("device_id"))
    .values(current_density=bindparam("density"), status=bindparam("new_status"))
)

MAX_SERVED_REQUESTS = 10**9  # per density between two heartbeats: far above any device, below any overflow


def _check_served(served: Mapping[float, tuple[int, float, float]]) -> dict[str, list[float]]:
    """What a device says it served, checked: densities in (0, 1], counts and busy time finite, >= 0, bounded;
    the summed confidence of its requests (each a probability) in [0, requests]."""
    if len(served) > MAX_METRICS:
        raise InvalidInputError(f"served lists {len(served)} densities; at most {MAX_METRICS}")
    usage = {}
    for density, (requests, busy_ms, confidence) in served.items():
        check_density(density, "served density")
        if not (isinstance(requests, int) and 0 <= requests <= MAX_SERVED_REQUESTS):
            raise InvalidInputError(f"served requests at density {density:g} must be 0..{MAX_SERVED_REQUESTS}, "
                                    f"got {requests!r}")
        if not (math.isfinite(busy_ms) and 0 <= busy_ms <= 1e12):
            raise InvalidInputError(f"served busy_ms at density {density:g} must be finite and >= 0, got {busy_ms}")
        if not (math.isfinite(confidence) and 0 <= confidence <= requests):
            raise InvalidInputError(f"served confidence_sum at density {density:g} must be in [0, requests], "
                                    f"got {confidence}")
        usage[str(density)] = [requests, float(busy_ms), float(confidence)]
    return usage


MAX_CHECK_EXAMPLES = 1_000_000  # labelled images a device checks a version on: far above any device's


def _check_checks(checks: Mapping[tuple[str, float], tuple[int, int]]) -> dict[tuple[str, float], tuple[int, int]]:
    """What a device says its labelled checks gave ((version, density) -> examples, correct), checked: at most
    MAX_METRICS entries, densities in (0, 1], 0 < examples <= MAX_CHECK_EXAMPLES, 0 <= correct <= examples."""
    if len(checks) > MAX_METRICS:
        raise InvalidInputError(f"checks list {len(checks)} entries; at most {MAX_METRICS}")
    for (version, density), (examples, correct) in checks.items():
        check_density(density, "checked density")
        if not 0 < len(version) <= MAX_NAME_LENGTH:
            raise InvalidInputError(f"a check names model version {version!r}; expected 1 to {MAX_NAME_LENGTH} "
                                    "characters")
        if not (isinstance(examples, int) and 0 < examples <= MAX_CHECK_EXAMPLES):
            raise InvalidInputError(f"check of {version!r} at density {density:g}: examples must be "
                                    f"1..{MAX_CHECK_EXAMPLES}, got {examples!r}")
        if not (isinstance(correct, int) and 0 <= correct <= examples):
            raise InvalidInputError(f"check of {version!r} at density {density:g}: correct must be 0..{examples}, "
                                    f"got {correct!r}")
    return dict(checks)


def _record_checks(conn: Connection, device_id: int, checks: dict[tuple[str, float], tuple[int, int]],
                   now: Any) -> None:
    """Store a device's checks, each replacing the one it reported before for the same version and density;
    InvalidInputError for a version the registry does not hold."""
    versions = {version for version, _ in checks}
    known = set(conn.scalars(select(ModelVersion.version).where(ModelVersion.version.in_(versions))))
    if unknown := sorted(versions - known):
        raise InvalidInputError(f"checks name model versions never published: {unknown}")
    for (version, density), (examples, correct) in checks.items():
        conn.execute(delete(VersionCheck).where(VersionCheck.device_id == device_id,
                                                VersionCheck.model_version == version,
                                                VersionCheck.density == density))
        conn.execute(insert(VersionCheck).values(device_id=device_id, model_version=version, density=density,
                                                 examples=examples, correct=correct, checked_at=now))


def _calibrated(calibration: list[dict[str, float]]) -> list[float]:
    return [point["density"] for point in calibration]


def _require_calibrated(device_id: int, density: float, calibration: list[dict[str, float]]) -> None:
    if density not in _calibrated(calibration):
        raise InvalidInputError(f"device {device_id} is not calibrated at density {density:g}; calibrated: "
                                + ", ".join(f"{d:g}" for d in _calibrated(calibration)))


def _budget(latency_ms: float | None, memory_mb: float | None, battery: float | None) -> Budget | None:
    return None if latency_ms is None or memory_mb is None else Budget(latency_ms, memory_mb, battery)


def supernode_fields(supernode: tuple[str, int] | None) -> dict[str, Any]:
    if supernode is None:
        return {}
    key_sha256, node_id = supernode
    if not 0 <= node_id < 1 << 64:
        raise InvalidInputError(f"Flower node id must be a uint64, got {node_id}")
    return {"supernode_key_sha256": key_sha256, "flower_node_id": node_id}


def new_device_id() -> int:
    """A random id: one device's id says nothing about another's. Ids are not secrets (they show in tables and
    logs); every call proves its device by credential, so a guessed id gives nothing."""
    return secrets.randbelow(DEVICE_ID_LIMIT - 1) + 1


class DeviceRecords(Store):
    """Devices, their budgets and density history."""

    def register_device(
        self,
        name: str,
        profile: str,
        calibration: Iterable[CalibrationPoint],
        supernode: tuple[str, int] | None = None,
    ) -> Assignment:
        """Register a device, or re-register one by name (an agent restart); returns its first density.

        The first density is what fits the profile's tightest typical budget: safe until the
        device's first heartbeat says what it can really afford. Whoever calls this vouches for the caller
        being device ``name`` (the control plane: its credential); a new device comes in by ``enroll_device``.
        ``supernode`` = (key digest, Flower node id): the SuperNode key the coordinator registered for it.
        """
        fields = {**self._registration(name, profile, calibration), **supernode_fields(supernode)}
        return self._retry_insert(lambda conn: self._upsert_device(conn, name, fields))

    @staticmethod
    def _registration(name: str, profile: str, calibration: Iterable[CalibrationPoint]) -> dict[str, Any]:
        """A device row's registration fields, checked; the first density from the profile's tightest budget."""
        try:
            check_name(name)  # it names files and rows operators read: no markup, control or direction characters
            spec = get_profile(profile)
            table = validate_calibration(calibration)
        except (UnknownProfileError, ValueError) as e:
            raise InvalidInputError(str(e)) from e
        density = choose_density(table, Budget(spec.budget_latency_ms.low, spec.budget_memory_mb.low))
        return {"profile": profile, "status": DeviceStatus.ONLINE,
                "calibration": [dataclasses.asdict(p) for p in table],
                "current_density": density}

    def _retry_insert(self, change: Callable[[Connection], T]) -> T:
        """``change(conn)`` in one write transaction, once more if a concurrent insert (same name, or the same
        random id) won the race."""
        for attempt in range(3):
            try:
                with self._write() as conn:
                    return change(conn)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _upsert_device(self, conn: Connection, name: str, fields: dict[str, Any]) -> Assignment:
        now, density = utc_now(), fields["current_density"]
        row = conn.execute(
            select(Device.id, Device.current_density).where(Device.name == name).with_for_update()
        ).one_or_none()
        version = serving_version(conn, name)
        if row is None:
            device_id = conn.execute(
                insert(Device).values(id=new_device_id(), name=name, first_seen=now, registered_at=now, **fields)
                .returning(Device.id)
            ).scalar_one()
            changed = True
        else:
            device_id, changed = row.id, row.current_density != density
            conn.execute(update(Device).where(Device.id == device_id).values(registered_at=now, **fields))
        if changed:
            conn.execute(insert(DensityAssignment).values(
                device_id=device_id, density=density, reason=AssignmentReason.REGISTRATION,
                model_version=version, assigned_at=now))
        log.info("registered device %s (%s) as id %d at density %g", name, fields["profile"], device_id, density)
        return Assignment(device_id, density, changed, version)

    def heartbeat(self, device_id: int, budget: Budget,
                  served: Mapping[float, tuple[int, float, float]] | None = None,
                  served_version: str | None = None,
                  checks: Mapping[tuple[str, float], tuple[int, int]] | None = None) -> Assignment:
        """Record the budget and answer with the density that fits it (see policy.choose_density).

        Every heartbeat's budget is stored with the density it was given; a density change also adds
        an assignment row pointing at that budget. All in one transaction under the device's row lock.
        The device row itself is only written when its density or status changes. ``served`` (density ->
        requests, busy ms, summed confidence) is what the device's Predict ran since its last heartbeat, with
        ``served_version``, stored with the budget. ``checks`` ((version, density) -> examples, correct) are
        the device's labelled checks since it last reported them (``VersionCheck``). The answer names the version
        the device is to serve (coordinator.registry.rollouts).
        """
        now = utc_now()
        usage = _check_served(served) if served else None
        checked = _check_checks(checks) if checks else None
        with self._write() as conn:
            row = conn.execute(_LOCK_DEVICE, {"device_id": device_id}).one_or_none()
            if row is None:
                raise DeviceNotFoundError(f"device {device_id} is not registered")
            current, calibration, status, name = row
            version = version_in(self._recent_rollout(lambda: current_rollout(conn)), name)
            table = tuple(CalibrationPoint(**point) for point in calibration)  # stored densest first
            density = choose_density(table, budget, current, self.margin)
            budget_id = conn.execute(_INSERT_BUDGET, {
                "device_id": device_id, "latency_ms": budget.latency_ms, "memory_mb": budget.memory_mb,
                "battery": budget.battery, "assigned_density": density, "reported_at": now, "served": usage,
                # evidence for a rollout only under the version this device was given: none can speak for another
                "model_version": served_version if served_version == version else None,
            }).scalar_one()
            if checked:
                _record_checks(conn, device_id, checked, now)
            changed = density != current
            if changed:
                conn.execute(_INSERT_ASSIGNMENT, {
                    "device_id": device_id, "density": density, "reason": AssignmentReason.BUDGET_CHANGE,
                    "budget_id": budget_id, "model_version": version, "assigned_at": now,
                })
            if changed or status == DeviceStatus.OFFLINE:  # heard from again: online; draining stays draining
                new_status = DeviceStatus.ONLINE if status == DeviceStatus.OFFLINE else status
                conn.execute(_SET_DEVICE_STATE, {"device_id": device_id, "density": density, "new_status": new_status})
        if changed:
            log.info("device %d: density %g -> %g (budget %s)", device_id, current, density, budget)
        return Assignment(device_id, density, changed, version)

    def assign(
        self, device_id: int, density: float, reason: AssignmentReason = AssignmentReason.OPERATOR
    ) -> Assignment:
        """Set a device's density by decision (operator, training plan); always recorded in the history.

        It holds until a heartbeat's budget moves it (see policy.choose_density).
        """
        if reason not in _EXPLICIT_REASONS:
            raise InvalidInputError(f"assign() records decisions ({', '.join(_EXPLICIT_REASONS)}), not {reason}")
        density = check_density(density)
        with self._write() as conn:
            row = conn.execute(_LOCK_DEVICE, {"device_id": device_id}).one_or_none()
            if row is None:
                raise DeviceNotFoundError(f"device {device_id} is not registered")
            current, calibration, _status, name = row
            version = serving_version(conn, name)
            _require_calibrated(device_id, density, calibration)
            conn.execute(insert(DensityAssignment).values(
                device_id=device_id, density=density, reason=reason, model_version=version, assigned_at=utc_now()))
            conn.execute(update(Device).where(Device.id == device_id).values(current_density=density))
        log.info("device %d: density %g -> %g (%s)", device_id, current, density, reason)
        return Assignment(device_id, density, density != current, version)

    def set_status(self, device_ids: Iterable[int], status: DeviceStatus) -> None:
        """Set the status of several devices in one transaction (a simulation's fleet going offline at once)."""
        ids = sorted(set(device_ids))
        with self._write() as conn:
            found = set(conn.scalars(select(Device.id).where(Device.id.in_(ids))))
            if missing := [i for i in ids if i not in found]:
                raise DeviceNotFoundError(f"devices {missing} are not registered")
            conn.execute(update(Device).where(Device.id.in_(ids)).values(status=status))

    def bind_flower_nodes(self, nodes: Mapping[str, int]) -> None:
        """Record which Flower node each named device is (the ServerApp learns it by a status query)."""
        for name, node_id in nodes.items():
            if not 0 <= node_id < 1 << 64:
                raise InvalidInputError(f"Flower node id of {name!r} must be a uint64, got {node_id}")
        with self._write() as conn:
            for name, node_id in nodes.items():
                conn.execute(update(Device).where(Device.name == name).values(flower_node_id=node_id))

    def count_devices(self) -> int:
        """How many devices are registered: the fleet the heartbeat period is sized for."""
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(Device)) or 0

    def device_counts(self) -> dict[tuple[DeviceStatus, str, float], int]:
        """How many devices there are of each status, profile and density: one grouped query, whatever the
        fleet's size."""
        columns = (Device.status, Device.profile, Device.current_density)
        with self._read() as s:
            return {(status, profile, density): n
                    for status, profile, density, n in s.execute(select(*columns, func.count()).group_by(*columns))}

    def device_profiles(self) -> dict[str, str]:
        """Every device's profile, by name: two short columns, for views that group devices by profile."""
        with self._read() as s:
            return {name: profile for name, profile in s.execute(select(Device.name, Device.profile))}

    def mark_offline(self, stale_after: timedelta) -> int:
        """Mark online devices silent for longer than `stale_after` offline; returns how many."""
        cutoff = utc_now() - stale_after
        last_report = (select(BudgetReport.reported_at).where(BudgetReport.id == _LATEST_BUDGET_ID)
                       .scalar_subquery())
        with self._write() as conn:
            return conn.execute(
                update(Device)
                .where(Device.status == DeviceStatus.ONLINE, Device.registered_at < cutoff,
                       func.coalesce(last_report, Device.registered_at) < cutoff)
                .values(status=DeviceStatus.OFFLINE)
            ).rowcount

    def calibrated_densities(self, device_id: int) -> list[float]:
        """The densities the device measured, densest first."""
        with self._read() as s:
            calibration = s.scalar(select(Device.calibration).where(Device.id == device_id))
        if calibration is None:
            raise DeviceNotFoundError(f"device {device_id} is not registered")
        return _calibrated(calibration)

    def get_device(self, device_id: int) -> DeviceInfo:
        """One device with its latest reported budget."""
        found = self.list_devices(device_id)
        if not found:
            raise DeviceNotFoundError(f"device {device_id} is not registered")
        return found[0]

    def list_devices(self, device_id: int | None = None, *, name: str | None = None, offset: int = 0,
                     limit: int | None = None) -> list[DeviceInfo]:
        """Every device (or just `device_id`, or `name`) with its latest reported budget, by name; ``offset`` and
        ``limit`` page through them in the database (a page of a 10,000-device fleet reads only its rows)."""
        query = (
            select(Device, BudgetReport.latency_ms, BudgetReport.memory_mb, BudgetReport.battery,
                   BudgetReport.reported_at, BudgetReport.model_version)
            .outerjoin(BudgetReport, BudgetReport.id == _LATEST_BUDGET_ID)
            .order_by(Device.name).offset(offset).limit(limit)
        )
        if device_id is not None:
            query = query.where(Device.id == device_id)
        if name is not None:
            query = query.where(Device.name == name)
        with self._read() as s:
            return [
                DeviceInfo(d.id, d.name, d.profile, d.flower_node_id, d.status, d.current_density, d.first_seen,
                           max(d.registered_at, reported_at or d.registered_at), _budget(latency, memory, battery),
                           tuple(CalibrationPoint(**point) for point in d.calibration), version)
                for d, latency, memory, battery, reported_at, version in s.execute(query)
            ]

    def served_totals(self, device_id: int) -> dict[float, tuple[int, float]]:
        """Everything the device reported its Predict ran, per density: (requests, busy ms), summed."""
        totals: dict[float, list[float]] = {}
        with self._read() as s:
            for usage in s.scalars(select(BudgetReport.served).where(BudgetReport.device_id == device_id)):
                for density, numbers in (usage or {}).items():
                    entry = totals.setdefault(float(density), [0, 0.0])
                    entry[0] += int(numbers[0])
                    entry[1] += float(numbers[1])
        return {d: (int(r), ms) for d, (r, ms) in sorted(totals.items(), reverse=True)}

    def device_history(self, device_id: int) -> list[AssignmentRecord]:
        """The device's density assignments, oldest first."""
        query = (
            select(DensityAssignment, BudgetReport.latency_ms, BudgetReport.memory_mb, BudgetReport.battery)
            .outerjoin(BudgetReport, BudgetReport.id == DensityAssignment.budget_id)
            .where(DensityAssignment.device_id == device_id)
            .order_by(DensityAssignment.id)
        )
        with self._read() as s:
            if s.get(Device, device_id) is None:
                raise DeviceNotFoundError(f"device {device_id} is not registered")
            return [
                AssignmentRecord(a.density, a.reason, _budget(latency, memory, battery), a.model_version,
                                 a.assigned_at)
                for a, latency, memory, battery in s.execute(query)
            ]

