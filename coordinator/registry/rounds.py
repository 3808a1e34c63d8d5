"""Training rounds and model versions: what each round did and which checkpoint each version is."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from coordinator.registry.errors import DeviceNotFoundError, InvalidInputError
from coordinator.registry.models import (
    Device,
    ModelVersion,
    RoundStart,
    TrainingRound,
    VersionStatus,
)
from coordinator.registry.records import RoundRecord, RoundUnderWay
from coordinator.registry.rollouts import supersede_candidates, version_status
from coordinator.registry.store import LATEST_VERSION, MAX_METRICS, MAX_NAME_LENGTH, Store, check_density, utc_now

log = logging.getLogger(__name__)


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


def _version_row(version: str, checkpoint_path: str, densities: Iterable[float]) -> dict[str, Any]:
    """A model_versions row, checked."""
    if not 0 < len(version) <= MAX_NAME_LENGTH:
        raise InvalidInputError(f"model version must be 1-{MAX_NAME_LENGTH} characters")
    packed = sorted({check_density(d) for d in densities}, reverse=True)
    if not packed:
        raise InvalidInputError("a model version needs at least one density")
    return {"version": version, "checkpoint_path": checkpoint_path, "densities": packed, "created_at": utc_now()}


def _publish(conn: Connection, row: dict[str, Any], canary: float) -> None:
    """Insert a version row: a candidate for ``canary`` of the fleet (undecided older ones superseded), or
    promoted (rollouts off, or nothing promoted yet to compare it with)."""
    if not 0.0 <= canary <= 1.0:
        raise InvalidInputError(f"a canary share must be in [0, 1], got {canary}")
    status = version_status(canary, conn)
    if status == VersionStatus.CANDIDATE:
        supersede_candidates(conn, row["version"])
    conn.execute(insert(ModelVersion).values(**row, status=status, canary=canary))


class RoundRecords(Store):
    """Rounds, their metrics and details, and model versions."""

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
        canary: float = 0.0,
    ) -> None:
        """Store one finished training round; `model_version` defaults to the current one.

        `details` (JSON) is what the live view and the report show besides: who trained by name, bytes per
        density, timings. ``published`` = (checkpoint path, densities) publishes ``model_version`` in the same
        transaction: a crash leaves the round both recorded and published, or neither (a restart redoes it).
        ``canary`` > 0: the version is a candidate served by that share of the fleet until it is judged
        (coordinator.registry.rollouts)."""
        if bytes_sent < 0 or bytes_received < 0:
            raise InvalidInputError("byte counts must be >= 0")
        if published is not None and model_version is None:
            raise InvalidInputError("publishing a round's model needs its model version")
        version_row = None if published is None else _version_row(model_version, *published)  # type: ignore[arg-type]
        members = [{"device_id": int(d), "density": check_density(x)} for d, x in participants.items()]
        per_density = {str(check_density(d)): _check_metrics(m, f"round {round_number}") for d, m in metrics.items()}
        try:
            with self._write() as conn:
                ids = {m["device_id"] for m in members}
                unknown = sorted(ids - set(conn.scalars(select(Device.id).where(Device.id.in_(ids)))))
                if unknown:
                    raise DeviceNotFoundError(f"round {round_number}: unregistered devices {unknown}")
                if version_row is not None:
                    _publish(conn, version_row, canary)
                conn.execute(insert(TrainingRound).values(
                    round=round_number, participants=members, metrics=per_density, bytes_sent=bytes_sent,
                    bytes_received=bytes_received, model_version=model_version or conn.scalar(LATEST_VERSION),
                    recorded_at=utc_now(), details=dict(details or {})))
        except IntegrityError as e:
            raise InvalidInputError(f"round {round_number} already recorded, or model version {model_version!r} "
                                    "unknown or (publishing) already existing") from e
        if published is not None:
            self._rollout_changed()
            log.info("model version %s at densities %s", model_version, version_row["densities"])  # type: ignore[index]

    def list_rounds(self, after: int = 0, limit: int | None = None) -> list[RoundRecord]:
        """Recorded rounds numbered above ``after``, oldest first, at most ``limit`` (read in the database: a
        live view asking for what is new reads only that)."""
        query = select(TrainingRound).where(TrainingRound.round > after).order_by(TrainingRound.round).limit(limit)
        with self._read() as s:
            return [
                RoundRecord(r.round, {p["device_id"]: p["density"] for p in r.participants},
                            {float(d): m for d, m in r.metrics.items()}, r.bytes_sent, r.bytes_received,
                            r.model_version, r.recorded_at, r.details or {})
                for r in s.scalars(query)
            ]

    def last_round(self) -> int:
        """The highest round recorded, 0 before the first: where a restarted coordinator continues from."""
        with self._read() as s:
            return s.scalar(select(func.max(TrainingRound.round))) or 0

    def count_rounds(self) -> int:
        """Rounds recorded so far: what a poller asks every fraction of a second, without reading them."""
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(TrainingRound)) or 0

    def start_round(self, round_number: int, sent: Mapping[str, float], timeout_s: float | None) -> None:
        """Record that round ``round_number`` sent training to ``sent`` (device name -> density) and waits up to
        ``timeout_s`` for them; a round begun again (a resumed run) replaces its earlier start. One transaction."""
        row = {"round": round_number, "sent": {name: check_density(d) for name, d in sent.items()},
               "timeout_s": timeout_s, "started_at": utc_now()}
        with self._write() as conn:
            conn.execute(delete(RoundStart).where(RoundStart.round == round_number))
            conn.execute(insert(RoundStart).values(**row))

    def last_round_started(self) -> int:
        """The highest round begun (``start_round``), 0 before the first."""
        with self._read() as s:
            return s.scalar(select(func.max(RoundStart.round))) or 0

    def round_under_way(self) -> RoundUnderWay | None:
        """The latest round begun and not yet recorded, or None."""
        with self._read() as s:
            start = s.scalars(select(RoundStart).order_by(RoundStart.round.desc()).limit(1)).one_or_none()
            if start is None or s.scalar(select(TrainingRound.id).where(TrainingRound.round == start.round)):
                return None
            return RoundUnderWay(start.round, dict(start.sent), start.timeout_s, start.started_at)

    def add_model_version(self, version: str, checkpoint_path: str, densities: Iterable[float],
                          canary: float = 0.0) -> None:
        """Publish a new model version; heartbeats answer with it from now on (``canary`` > 0: to that share of
        the fleet, while it is a candidate)."""
        row = _version_row(version, checkpoint_path, densities)
        try:
            with self._write() as conn:
                _publish(conn, row, canary)
        except IntegrityError as e:
            raise InvalidInputError(f"model version {version!r} already exists") from e
        self._rollout_changed()
        log.info("model version %s at densities %s", version, row["densities"])

    def current_model_version(self) -> str | None:
        with self._read() as s:
            return s.scalar(LATEST_VERSION)

    def model_checkpoint(self, version: str) -> str | None:
        """The checkpoint a published model version was saved to, or None for an unknown version."""
        with self._read() as s:
            return s.scalar(select(ModelVersion.checkpoint_path).where(ModelVersion.version == version))
