"""The registry's typed repository API: one database transaction per logical change.

Writers lock the device row (SELECT ... FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) before
reading its current density, so concurrent heartbeats for one device never lose an update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from contracts.credentials import CREDENTIAL_PREFIX, TOKEN_PREFIX, digest, new_secret
from contracts.naming import check_name
from contracts.policy import DEFAULT_MARGIN, Budget, CalibrationPoint, choose_density, validate_calibration
from contracts.profiles import UnknownProfileError, get_profile
from coordinator.registry.engine import READ_ONLY, default_url, is_sqlite, make_engine
from coordinator.registry.errors import DeviceNotFoundError, EnrollmentError, InvalidInputError
from coordinator.registry.migrate import upgrade
from coordinator.registry.models import (
    AssignmentReason,
    BudgetReport,
    DensityAssignment,
    Device,
    DeviceStatus,
    Enrollment,
    ModelVersion,
    TrainingRound,
)
from coordinator.registry.records import Assignment, AssignmentRecord, DeviceInfo, Principal, RoundRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_NAME_LENGTH = 128
DEVICE_ID_LIMIT = 2**31  # devices.id is a 32-bit INTEGER on PostgreSQL
DEFAULT_ENROLLMENT_TTL = timedelta(hours=24)
MAX_METRICS = 256
_EXPLICIT_REASONS = (AssignmentReason.OPERATOR, AssignmentReason.TRAINING_ASSIGNMENT)
_LATEST_VERSION = select(ModelVersion.version).order_by(ModelVersion.id.desc()).limit(1)
_LATEST_BUDGET_ID = (
    select(func.max(BudgetReport.id)).where(BudgetReport.device_id == Device.id).correlate(Device).scalar_subquery()
)

# The heartbeat path runs ~1,000 times a second: its statements are built once, with bind parameters,
# so each call skips statement construction and cache-key generation (half its CPU time otherwise).
_devices, _budgets, _assignments = Device.__table__, BudgetReport.__table__, DensityAssignment.__table__
_LOCK_DEVICE = (
    select(_devices.c.current_density, _devices.c.calibration, _devices.c.status, _LATEST_VERSION.scalar_subquery())
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


def _now() -> datetime:
    return datetime.now(UTC)


def _check_density(density: float, what: str = "density") -> float:
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise InvalidInputError(f"{what} must be in (0, 1], got {density!r}")
    return float(density)


def _check_metrics(metrics: Mapping[str, float], what: str) -> dict[str, float]:
    """Metric maps go into JSON columns, where NaN and infinities are not representable."""
    if len(metrics) > MAX_METRICS:
        raise InvalidInputError(f"{what}: {len(metrics)} metrics; at most {MAX_METRICS} allowed")
    for name, value in metrics.items():
        if not name or len(name) > MAX_NAME_LENGTH:
            raise InvalidInputError(f"{what}: metric names must be 1-{MAX_NAME_LENGTH} characters, got {name!r}")
        if not math.isfinite(value):
            raise InvalidInputError(f"{what}: metric {name!r} must be finite, got {value!r}")
    return {name: float(value) for name, value in metrics.items()}


MAX_SERVED_REQUESTS = 10**9  # per density between two heartbeats: far above any device, below any overflow


def _check_served(served: Mapping[float, tuple[int, float]]) -> dict[str, list[float]]:
    """What a device says it served, checked: densities in (0, 1], counts and busy time finite, >= 0, bounded."""
    if len(served) > MAX_METRICS:
        raise InvalidInputError(f"served lists {len(served)} densities; at most {MAX_METRICS}")
    usage = {}
    for density, (requests, busy_ms) in served.items():
        _check_density(density, "served density")
        if not (isinstance(requests, int) and 0 <= requests <= MAX_SERVED_REQUESTS):
            raise InvalidInputError(f"served requests at density {density:g} must be 0..{MAX_SERVED_REQUESTS}, "
                                    f"got {requests!r}")
        if not (math.isfinite(busy_ms) and 0 <= busy_ms <= 1e12):
            raise InvalidInputError(f"served busy_ms at density {density:g} must be finite and >= 0, got {busy_ms}")
        usage[str(density)] = [requests, float(busy_ms)]
    return usage


def _calibrated(calibration: list[dict[str, float]]) -> list[float]:
    return [point["density"] for point in calibration]


def _require_calibrated(device_id: int, density: float, calibration: list[dict[str, float]]) -> None:
    if density not in _calibrated(calibration):
        raise InvalidInputError(f"device {device_id} is not calibrated at density {density:g}; calibrated: "
                                + ", ".join(f"{d:g}" for d in _calibrated(calibration)))


def _budget(latency_ms: float | None, memory_mb: float | None, battery: float | None) -> Budget | None:
    return None if latency_ms is None or memory_mb is None else Budget(latency_ms, memory_mb, battery)


def _supernode_fields(supernode: tuple[str, int] | None) -> dict[str, Any]:
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


def _version_row(version: str, checkpoint_path: str, densities: Iterable[float]) -> dict[str, Any]:
    """A model_versions row, checked."""
    if not 0 < len(version) <= MAX_NAME_LENGTH:
        raise InvalidInputError(f"model version must be 1-{MAX_NAME_LENGTH} characters")
    packed = sorted({_check_density(d) for d in densities}, reverse=True)
    if not packed:
        raise InvalidInputError("a model version needs at least one density")
    return {"version": version, "checkpoint_path": checkpoint_path, "densities": packed, "created_at": _now()}


class Registry:
    """Devices, their budgets and density history, training rounds and model versions.

    Opens (and migrates) the database at `db_url`, or an embedded SQLite file under `state_dir`.
    Thread-safe: the control plane calls it from many server threads at once.
    """

    def __init__(
        self,
        db_url: str | None = None,
        *,
        state_dir: Path | str = "state",
        margin: float = DEFAULT_MARGIN,
        pool_size: int = 10,
        max_overflow: int = 10,
    ) -> None:
        self.url = db_url or default_url(state_dir)
        self.margin = margin
        upgrade(self.url)
        self._engine = make_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
        self._sessions = sessionmaker(self._engine.execution_options(**{READ_ONLY: True}))
        # SQLite has one writer at a time anyway; queueing our own threads on a lock hands it over
        # promptly, where SQLite's busy handler would sleep and retry.
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if is_sqlite(self.url) else contextlib.nullcontext()
        )

    @property
    def safe_url(self) -> str:
        """The database URL with any password masked, for logs and people."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: committed whole on success, rolled back whole on any error.

        Writes use Core connections, not ORM sessions: no identity map to maintain, a third less CPU.
        """
        with self._write_lock, self._engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- devices -------------------------------------------------------------------------------------

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
        fields = {**self._registration(name, profile, calibration), **_supernode_fields(supernode)}
        return self._retry_insert(lambda conn: self._upsert_device(conn, name, fields))

    def enroll_device(
        self,
        token: str,
        name: str,
        profile: str,
        calibration: Iterable[CalibrationPoint],
        supernode: tuple[str, int] | None = None,
    ) -> tuple[Assignment, str]:
        """Spend an enrollment token: register the device it names (an empty ``name`` takes the token's) and
        answer its new credential, the only copy there will be; a device already under that name is
        re-enrolled and its old credential stops working. One transaction: the token is spent if and only if
        the device is registered with the new credential."""
        now = _now()

        def spend(conn: Connection) -> tuple[Assignment, str]:
            row = conn.execute(select(Enrollment.id, Enrollment.name, Enrollment.expires_at, Enrollment.used_at)
                               .where(Enrollment.token_sha256 == digest(token)).with_for_update()).one_or_none()
            if row is None or row.used_at is not None or row.expires_at <= now:
                raise EnrollmentError("the enrollment token is unknown, spent or expired: ask the operator for "
                                      "a new one (dress-fleet devices enroll NAME)")
            if name and name != row.name:
                raise EnrollmentError(f"the enrollment token is for device {row.name!r}, not {name!r}")
            credential = new_secret(CREDENTIAL_PREFIX)
            fields = {**self._registration(row.name, profile, calibration), "credential_sha256": digest(credential),
                      **_supernode_fields(supernode)}
            assignment = self._upsert_device(conn, row.name, fields)
            conn.execute(update(Enrollment).where(Enrollment.id == row.id)
                         .values(used_at=now, device_id=assignment.device_id))
            return assignment, credential

        assignment, credential = self._retry_insert(spend)
        log.info("enrolled device id %d", assignment.device_id)
        return assignment, credential

    def enroll(self, names: Iterable[str], ttl: timedelta = DEFAULT_ENROLLMENT_TTL) -> dict[str, str]:
        """A one-time token per device name, valid for ``ttl``, in one transaction; only digests are stored.

        A token lets its holder register once as that name (``enroll_device``); enrolling a name that is
        already registered lets a replacement device take it over."""
        names = list(dict.fromkeys(names))
        try:
            for name in names:
                check_name(name)
        except ValueError as e:
            raise InvalidInputError(str(e)) from e
        if ttl <= timedelta(0):
            raise InvalidInputError(f"an enrollment must stay valid for a positive time, got {ttl}")
        now = _now()
        tokens = {name: new_secret(TOKEN_PREFIX) for name in names}
        if tokens:
            with self._write() as conn:
                conn.execute(insert(Enrollment), [
                    {"name": name, "token_sha256": digest(token), "created_at": now, "expires_at": now + ttl}
                    for name, token in tokens.items()])
        return tokens

    def supernode_of(self, name: str) -> tuple[str | None, int | None]:
        """The digest of the SuperNode key registered for device ``name`` and its Flower node id (None, None)."""
        with self._read() as s:
            row = s.execute(select(Device.supernode_key_sha256, Device.flower_node_id)
                            .where(Device.name == name)).one_or_none()
        return (None, None) if row is None else (row[0], row[1])

    def authenticate(self, secret: str) -> Principal | None:
        """Who ``secret`` proves the caller is: the device whose credential it is, the name of an unspent and
        unexpired enrollment token, or None."""
        key = digest(secret)
        with self._read() as s:
            if secret.startswith(CREDENTIAL_PREFIX):
                row = s.execute(select(Device.id, Device.name).where(Device.credential_sha256 == key)).one_or_none()
                return None if row is None else Principal(row.name, row.id)
            if secret.startswith(TOKEN_PREFIX):
                name = s.scalar(select(Enrollment.name).where(
                    Enrollment.token_sha256 == key, Enrollment.used_at.is_(None), Enrollment.expires_at > _now()))
                return None if name is None else Principal(name, None)
        return None

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
        now, density = _now(), fields["current_density"]
        row = conn.execute(
            select(Device.id, Device.current_density).where(Device.name == name).with_for_update()
        ).one_or_none()
        version = conn.scalar(_LATEST_VERSION)
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
                  served: Mapping[float, tuple[int, float]] | None = None) -> Assignment:
        """Record the budget and answer with the density that fits it (see policy.choose_density).

        Every heartbeat's budget is stored with the density it was given; a density change also adds
        an assignment row pointing at that budget. All in one transaction under the device's row lock.
        The device row itself is only written when its density or status changes. ``served`` (density ->
        requests, busy ms) is what the device's Predict ran since its last heartbeat, stored with the budget.
        """
        now = _now()
        usage = _check_served(served) if served else None
        with self._write() as conn:
            row = conn.execute(_LOCK_DEVICE, {"device_id": device_id}).one_or_none()
            if row is None:
                raise DeviceNotFoundError(f"device {device_id} is not registered")
            current, calibration, status, version = row
            table = tuple(CalibrationPoint(**point) for point in calibration)  # stored densest first
            density = choose_density(table, budget, current, self.margin)
            budget_id = conn.execute(_INSERT_BUDGET, {
                "device_id": device_id, "latency_ms": budget.latency_ms, "memory_mb": budget.memory_mb,
                "battery": budget.battery, "assigned_density": density, "reported_at": now, "served": usage,
            }).scalar_one()
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
        density = _check_density(density)
        with self._write() as conn:
            row = conn.execute(_LOCK_DEVICE, {"device_id": device_id}).one_or_none()
            if row is None:
                raise DeviceNotFoundError(f"device {device_id} is not registered")
            current, calibration, _status, version = row
            _require_calibrated(device_id, density, calibration)
            conn.execute(insert(DensityAssignment).values(
                device_id=device_id, density=density, reason=reason, model_version=version, assigned_at=_now()))
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

    def mark_offline(self, stale_after: timedelta) -> int:
        """Mark online devices silent for longer than `stale_after` offline; returns how many."""
        cutoff = _now() - stale_after
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

    def list_devices(self, device_id: int | None = None) -> list[DeviceInfo]:
        """Every device (or just `device_id`) with its latest reported budget, by name."""
        query = (
            select(Device, BudgetReport.latency_ms, BudgetReport.memory_mb, BudgetReport.battery,
                   BudgetReport.reported_at)
            .outerjoin(BudgetReport, BudgetReport.id == _LATEST_BUDGET_ID)
            .order_by(Device.name)
        )
        if device_id is not None:
            query = query.where(Device.id == device_id)
        with self._read() as s:
            return [
                DeviceInfo(d.id, d.name, d.profile, d.flower_node_id, d.status, d.current_density, d.first_seen,
                           max(d.registered_at, reported_at or d.registered_at), _budget(latency, memory, battery),
                           tuple(CalibrationPoint(**point) for point in d.calibration))
                for d, latency, memory, battery, reported_at in s.execute(query)
            ]

    def served_totals(self, device_id: int) -> dict[float, tuple[int, float]]:
        """Everything the device reported its Predict ran, per density: (requests, busy ms), summed."""
        totals: dict[float, list[float]] = {}
        with self._read() as s:
            for usage in s.scalars(select(BudgetReport.served).where(BudgetReport.device_id == device_id)):
                for density, (requests, busy_ms) in (usage or {}).items():
                    entry = totals.setdefault(float(density), [0, 0.0])
                    entry[0] += int(requests)
                    entry[1] += float(busy_ms)
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

    # -- metrics, rounds, model versions ---------------------------------------------------------------

    def record_round(
        self,
        round_number: int,
        participants: Mapping[int, float],
        metrics: Mapping[float, Mapping[str, float]],
        bytes_sent: int,
        bytes_received: int,
        model_version: str | None = None,
        details: Mapping[str, Any] | None = None,
        published: tuple[str, Iterable[float]] | None = None,
    ) -> None:
        """Store one finished training round; `model_version` defaults to the current one.

        `details` (JSON) is what the live view and the report show besides: who trained by name, bytes per
        density, timings. ``published`` = (checkpoint path, densities) publishes ``model_version`` in the same
        transaction: a crash leaves the round both recorded and published, or neither (a restart redoes it)."""
        if bytes_sent < 0 or bytes_received < 0:
            raise InvalidInputError("byte counts must be >= 0")
        if published is not None and model_version is None:
            raise InvalidInputError("publishing a round's model needs its model version")
        version_row = None if published is None else _version_row(model_version, *published)  # type: ignore[arg-type]
        members = [{"device_id": int(d), "density": _check_density(x)} for d, x in participants.items()]
        per_density = {str(_check_density(d)): _check_metrics(m, f"round {round_number}") for d, m in metrics.items()}
        try:
            with self._write() as conn:
                ids = {m["device_id"] for m in members}
                unknown = sorted(ids - set(conn.scalars(select(Device.id).where(Device.id.in_(ids)))))
                if unknown:
                    raise DeviceNotFoundError(f"round {round_number}: unregistered devices {unknown}")
                if version_row is not None:
                    conn.execute(insert(ModelVersion).values(**version_row))
                conn.execute(insert(TrainingRound).values(
                    round=round_number, participants=members, metrics=per_density, bytes_sent=bytes_sent,
                    bytes_received=bytes_received, model_version=model_version or conn.scalar(_LATEST_VERSION),
                    recorded_at=_now(), details=dict(details or {})))
        except IntegrityError as e:
            raise InvalidInputError(f"round {round_number} already recorded, or model version {model_version!r} "
                                    "unknown or (publishing) already existing") from e
        if published is not None:
            log.info("model version %s at densities %s", model_version, version_row["densities"])  # type: ignore[index]

    def list_rounds(self) -> list[RoundRecord]:
        with self._read() as s:
            return [
                RoundRecord(r.round, {p["device_id"]: p["density"] for p in r.participants},
                            {float(d): m for d, m in r.metrics.items()}, r.bytes_sent, r.bytes_received,
                            r.model_version, r.recorded_at, r.details or {})
                for r in s.scalars(select(TrainingRound).order_by(TrainingRound.round))
            ]

    def last_round(self) -> int:
        """The highest round recorded, 0 before the first: where a restarted coordinator continues from."""
        with self._read() as s:
            return s.scalar(select(func.max(TrainingRound.round))) or 0

    def count_rounds(self) -> int:
        """Rounds recorded so far: what a poller asks every fraction of a second, without reading them."""
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(TrainingRound)) or 0

    def add_model_version(self, version: str, checkpoint_path: str, densities: Iterable[float]) -> None:
        """Publish a new model version; heartbeats answer with it from now on."""
        row = _version_row(version, checkpoint_path, densities)
        try:
            with self._write() as conn:
                conn.execute(insert(ModelVersion).values(**row))
        except IntegrityError as e:
            raise InvalidInputError(f"model version {version!r} already exists") from e
        log.info("model version %s at densities %s", version, row["densities"])

    def current_model_version(self) -> str | None:
        with self._read() as s:
            return s.scalar(_LATEST_VERSION)

    def model_checkpoint(self, version: str) -> str | None:
        """The checkpoint a published model version was saved to, or None for an unknown version."""
        with self._read() as s:
            return s.scalar(select(ModelVersion.checkpoint_path).where(ModelVersion.version == version))
