"""Registry tables as typed SQLAlchemy models; Alembic migrations are checked against this metadata."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would otherwise hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; registry timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Uint64(TypeDecorator[int]):
    """Flower node ids are full-range uint64; stored two's-complement in BIGINT, as Flower itself does."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if not 0 <= value < 1 << 64:
            raise ValueError(f"not a uint64: {value}")
        return value - (1 << 64) if value >= 1 << 63 else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return value + (1 << 64) if value < 0 else value


class DeviceStatus(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"  # still heartbeats, but gets no new training work


class AssignmentReason(enum.StrEnum):
    REGISTRATION = "registration"  # first density, from the profile's tightest typical budget
    BUDGET_CHANGE = "budget_change"
    TRAINING_ASSIGNMENT = "training_assignment"
    OPERATOR = "operator"


def _str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """A VARCHAR + CHECK enum: portable, and new members need no ALTER TYPE on PostgreSQL."""
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=32,
                values_callable=lambda members: [m.value for m in members])


# Append-only tables outgrow 2**31 rows at fleet heartbeat rates; SQLite only autoincrements INTEGER keys.
BigId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class VersionStatus(enum.StrEnum):
    """Where a model version is in its rollout."""

    CANDIDATE = "candidate"  # served by a canary share of the fleet while it is judged
    PROMOTED = "promoted"  # served by the fleet (the newest promoted one is the stable version)
    ROLLED_BACK = "rolled-back"  # served by nobody: it regressed, or an operator took it back
    SUPERSEDED = "superseded"  # a candidate a newer candidate replaced before it was judged


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(128), unique=True)
    checkpoint_path: Mapped[str] = mapped_column(String(1024))
    densities: Mapped[list[Any]]
    created_at: Mapped[datetime]
    status: Mapped[VersionStatus] = mapped_column(_str_enum(VersionStatus, "version_status"))
    canary: Mapped[float] = mapped_column(Float)  # the share of devices a candidate goes to
    decided_at: Mapped[datetime | None]  # promoted or rolled back (by the judge or an operator), when
    reason: Mapped[str | None] = mapped_column(String(512))  # and why


class Device(Base):
    """A registered device. Heartbeats do not update this row (see BudgetReport): its last seen time is
    derived from its latest budget, which saves an UPDATE, and a dead row version, per heartbeat."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(primary_key=True)  # random, not sequential: see repository.new_device_id
    name: Mapped[str] = mapped_column(String(128), unique=True)
    profile: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the secret the device proves itself with (contracts.credentials); None: never enrolled
    credential_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    # a TLS fleet: the node its registered SuperNode key connects as; else learnt by the ServerApp's status query
    flower_node_id: Mapped[int | None] = mapped_column(Uint64)
    supernode_key_sha256: Mapped[str | None] = mapped_column(String(64))  # the key registered with the SuperLink
    status: Mapped[DeviceStatus] = mapped_column(_str_enum(DeviceStatus, "device_status"))
    calibration: Mapped[list[Any]]  # [{density, latency_ms, memory_mb, train_ms, train_memory_mb}], densest first
    current_density: Mapped[float] = mapped_column(Float)
    first_seen: Mapped[datetime]
    registered_at: Mapped[datetime]  # latest (re-)registration


class Enrollment(Base):
    """A one-time token an operator issued for a device name; the device's first Register spends it."""

    __tablename__ = "enrollments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"))


class Operator(Base):
    """A person (or a monitoring system) allowed to watch the fleet: the dashboard and the metrics."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    credential_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]


class BudgetReport(Base):
    """Every heartbeat's budget together with the density it was answered with, so no heartbeat is lost."""

    __tablename__ = "budgets"
    __table_args__ = (Index("ix_budgets_device_id_id", "device_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    latency_ms: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[float] = mapped_column(Float)
    battery: Mapped[float | None] = mapped_column(Float)
    assigned_density: Mapped[float] = mapped_column(Float)
    reported_at: Mapped[datetime]
    # what Predict ran since the device's previous heartbeat: {"density": [requests, busy_ms, confidence_sum]}
    # (rows from before confidence was reported hold two numbers); None = nothing
    served: Mapped[dict[str, list[float]] | None] = mapped_column(JSON)
    model_version: Mapped[str | None] = mapped_column(String(128))  # the version that served them


class VersionCheck(Base):
    """A device's accuracy under one model version at one density on its own labelled check images, measured
    before it served the version (agent --check-set): the same images for every version, so a staged rollout
    compares versions per device. The latest report per (device, version, density) is kept."""

    __tablename__ = "version_checks"
    __table_args__ = (UniqueConstraint("device_id", "model_version", "density",
                                       name="uq_version_checks_device_version_density"),
                      Index("ix_version_checks_model_version", "model_version"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version", ondelete="CASCADE"))
    density: Mapped[float] = mapped_column(Float)
    examples: Mapped[int]
    correct: Mapped[int]
    checked_at: Mapped[datetime]


class DensityAssignment(Base):
    """A change of a device's density, with why it changed; the full history is kept."""

    __tablename__ = "density_assignments"
    __table_args__ = (Index("ix_density_assignments_device_id_id", "device_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    density: Mapped[float] = mapped_column(Float)
    reason: Mapped[AssignmentReason] = mapped_column(_str_enum(AssignmentReason, "assignment_reason"))
    budget_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("budgets.id", ondelete="SET NULL"))
    model_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    assigned_at: Mapped[datetime]


class RoundStart(Base):
    """A round as it began: who was sent training at which density, and how long it waits for them."""

    __tablename__ = "round_starts"

    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int] = mapped_column(unique=True)
    sent: Mapped[dict[str, Any]]  # device name -> density it was sent to train
    timeout_s: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime]


class TrainingRound(Base):
    __tablename__ = "training_rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int] = mapped_column(unique=True)
    participants: Mapped[list[Any]]  # [{device_id, density}]
    metrics: Mapped[dict[str, Any]]  # {"<density>": {metric: value}}
    bytes_sent: Mapped[int] = mapped_column(BigInteger)
    bytes_received: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    recorded_at: Mapped[datetime]
    details: Mapped[dict[str, Any] | None]  # who trained (by name), bytes per density, timings
