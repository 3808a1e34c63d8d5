"""Staged rollouts of model versions: which version each device serves, and the decisions that move versions.

A version published while rollouts are on (a canary share > 0) is a *candidate*: the devices whose name hashes
into its canary share serve it, the rest the *stable* version (the newest promoted one). It is then promoted
(the fleet serves it) or rolled back (nobody does) — by ``coordinator.rollout``'s judge from what the devices
report serving, or by an operator (``dress-fleet models``). A newer candidate supersedes an undecided one. With
no canary share every version is promoted as it is published.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select, update

from coordinator.registry.errors import InvalidInputError
from coordinator.registry.models import BudgetReport, ModelVersion, VersionCheck, VersionStatus
from coordinator.registry.store import Store, utc_now

_ROLLOUT = (select(ModelVersion.version, ModelVersion.status, ModelVersion.canary)
            .where(ModelVersion.status.in_((VersionStatus.PROMOTED, VersionStatus.CANDIDATE)))
            .order_by(ModelVersion.id.desc()).limit(2))  # at most one candidate, newer than the stable version


def in_canary(name: str, version: str, share: float) -> bool:
    """Whether device ``name`` is in ``version``'s canary ``share``: a hash, so each version draws its own
    devices, the same ones on every heartbeat and coordinator."""
    draw = int.from_bytes(hashlib.sha256(f"{version}\0{name}".encode()).digest()[:8], "big") / 2**64
    return draw < share


def current_rollout(conn: Connection) -> tuple[str | None, str | None, float]:
    """(stable version, candidate version, its canary share); None where there is none."""
    rows = conn.execute(_ROLLOUT).all()
    candidate = rows[0] if rows and rows[0].status == VersionStatus.CANDIDATE else None
    stable = next((r.version for r in rows if r.status == VersionStatus.PROMOTED), None)
    return stable, candidate.version if candidate else None, candidate.canary if candidate else 0.0


def version_in(rollout: tuple[str | None, str | None, float], name: str) -> str | None:
    """The version device ``name`` is to serve under ``rollout`` (``current_rollout``): the candidate where it is
    in its canary, else the stable one; None before any version is promoted."""
    stable, candidate, share = rollout
    return candidate if candidate is not None and in_canary(name, candidate, share) else stable


def serving_version(conn: Connection, name: str) -> str | None:
    """The version device ``name`` is to serve now (``version_in`` the current rollout)."""
    return version_in(current_rollout(conn), name)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: str
    status: VersionStatus
    canary: float
    created_at: datetime
    decided_at: datetime | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Served:
    """What one version served at one density: requests, forward-pass time, and summed top-class confidence
    (None where devices did not report it)."""

    requests: int
    busy_ms: float
    confidence_sum: float | None


DeviceChecks = dict[int, dict[float, tuple[int, int]]]  # device id -> density -> examples, correct


class Rollouts(Store):
    def version_for(self, name: str) -> str | None:
        """The version device ``name`` is to serve (``serving_version``)."""
        with self._read() as s:
            return serving_version(s.connection(), name)

    def list_versions(self) -> list[VersionInfo]:
        """Every model version, oldest first."""
        with self._read() as s:
            return [VersionInfo(v.version, v.status, v.canary, v.created_at, v.decided_at, v.reason)
                    for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]

    def rollout(self) -> tuple[str | None, str | None, float]:
        """(stable version, candidate version, its canary share); None where there is none."""
        with self._read() as s:
            return current_rollout(s.connection())

    def promote(self, version: str, reason: str) -> None:
        """The fleet serves ``version`` from its next heartbeats; undecided candidates older than it are
        superseded. One transaction."""
        self._decide(version, VersionStatus.PROMOTED, reason)

    def roll_back(self, version: str, reason: str) -> None:
        """Nobody serves ``version`` any more: its canary, or (a promoted one) the fleet, goes back to the newest
        promoted version before it. One transaction."""
        self._decide(version, VersionStatus.ROLLED_BACK, reason)

    def _decide(self, version: str, status: VersionStatus, reason: str) -> None:
        now = utc_now()
        with self._write() as conn:
            row = conn.execute(select(ModelVersion.id, ModelVersion.status)
                               .where(ModelVersion.version == version).with_for_update()).one_or_none()
            if row is None:
                raise InvalidInputError(f"no model version {version!r} (dress-fleet models list)")
            if row.status == status:
                raise InvalidInputError(f"model version {version!r} is {status} already")
            conn.execute(update(ModelVersion).where(ModelVersion.id == row.id)
                         .values(status=status, decided_at=now, reason=reason[:512]))
            if status == VersionStatus.PROMOTED:
                conn.execute(update(ModelVersion).where(ModelVersion.id < row.id,
                                                        ModelVersion.status == VersionStatus.CANDIDATE)
                             .values(status=VersionStatus.SUPERSEDED, decided_at=now,
                                     reason=f"superseded by {version}"))
        self._rollout_changed()

    def serving_evidence(self, since: datetime) -> dict[str, dict[int, dict[float, Served]]]:
        """What each version served, per device and density, as devices reported it in heartbeats since ``since``
        (only under the version each device was given: ``DeviceRecords.heartbeat``)."""
        totals: dict[str, dict[int, dict[float, list[float | None]]]] = {}
        with self._read() as s:
            for version, device_id, served in s.execute(
                    select(BudgetReport.model_version, BudgetReport.device_id, BudgetReport.served)
                    .where(BudgetReport.reported_at >= since, BudgetReport.served.is_not(None),
                           BudgetReport.model_version.is_not(None))):
                for density, numbers in served.items():
                    entry = totals.setdefault(version, {}).setdefault(device_id, {}).setdefault(
                        float(density), [0, 0.0, 0.0])
                    entry[0] += numbers[0]
                    entry[1] += numbers[1]
                    entry[2] = None if entry[2] is None or len(numbers) < 3 else entry[2] + numbers[2]
        return {v: {device: {d: Served(int(e[0]), float(e[1]), e[2]) for d, e in per.items()}
                    for device, per in devices.items()} for v, devices in totals.items()}

    def version_checks(self, version: str, devices_checking: str | None = None) -> DeviceChecks:
        """What devices' labelled checks of ``version`` gave, per device and density; with ``devices_checking``,
        only those of the devices that checked that version too (the judge pairs the stable version's checks with
        the candidate's canary: a few devices of a large fleet, read through the index)."""
        query = select(VersionCheck.device_id, VersionCheck.density, VersionCheck.examples, VersionCheck.correct) \
            .where(VersionCheck.model_version == version)
        if devices_checking is not None:
            query = query.where(VersionCheck.device_id.in_(
                select(VersionCheck.device_id).where(VersionCheck.model_version == devices_checking)))
        found: DeviceChecks = {}
        with self._read() as s:
            for device_id, density, examples, correct in s.execute(query):
                found.setdefault(device_id, {})[density] = (examples, correct)
        return found

    def device_checks(self, device_id: int) -> list[tuple[str, float, int, int, datetime]]:
        """One device's labelled checks, newest first: (version, density, examples, correct, when)."""
        with self._read() as s:
            return [tuple(row) for row in s.execute(  # type: ignore[misc]
                select(VersionCheck.model_version, VersionCheck.density, VersionCheck.examples, VersionCheck.correct,
                       VersionCheck.checked_at).where(VersionCheck.device_id == device_id)
                .order_by(VersionCheck.checked_at.desc(), VersionCheck.density.desc()))]

    def checked_accuracy(self, versions: list[str]) -> dict[str, tuple[int, float]]:
        """Per version any device checked: (devices, accuracy % over all their check images), summed in SQL."""
        with self._read() as s:
            rows = s.execute(select(VersionCheck.model_version, func.count(func.distinct(VersionCheck.device_id)),
                                    func.sum(VersionCheck.correct), func.sum(VersionCheck.examples))
                             .where(VersionCheck.model_version.in_(versions)).group_by(VersionCheck.model_version))
            return {version: (devices, 100 * correct / examples) for version, devices, correct, examples in rows}


def version_status(canary: float, conn: Connection) -> VersionStatus:
    """A newly published version's status: a candidate while rollouts are on and a stable version exists to
    compare it with; else promoted."""
    if canary <= 0:
        return VersionStatus.PROMOTED
    stable = conn.scalar(select(ModelVersion.id).where(ModelVersion.status == VersionStatus.PROMOTED).limit(1))
    return VersionStatus.CANDIDATE if stable is not None else VersionStatus.PROMOTED


def supersede_candidates(conn: Connection, version: str) -> None:
    """Undecided candidates are replaced by the one being published (``version``)."""
    conn.execute(update(ModelVersion).where(ModelVersion.status == VersionStatus.CANDIDATE)
                 .values(status=VersionStatus.SUPERSEDED, decided_at=utc_now(), reason=f"superseded by {version}"))
