"""The registry's database and what every part of it shares: the engine, one transaction per logical change
(writers queue on SQLite, whose one writer would otherwise sleep and retry), and the checks of what goes into
its columns."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session, sessionmaker

from contracts.policy import DEFAULT_MARGIN
from coordinator.registry.engine import READ_ONLY, default_url, is_sqlite, make_engine
from coordinator.registry.errors import InvalidInputError
from coordinator.registry.migrate import upgrade
from coordinator.registry.models import ModelVersion

T = TypeVar("T")

MAX_NAME_LENGTH = 128
MAX_METRICS = 256
# How long the heartbeat path reuses the rollout (which versions are stable and candidate) it last read: a fifth
# of a heartbeat's database time otherwise. This process's own changes are seen at once; another's (an operator's
# `dress-fleet models promote`) within this.
ROLLOUT_TTL_S = 1.0
LATEST_VERSION = select(ModelVersion.version).order_by(ModelVersion.id.desc()).limit(1)


def utc_now() -> datetime:
    return datetime.now(UTC)


def check_density(density: float, what: str = "density") -> float:
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise InvalidInputError(f"{what} must be in (0, 1], got {density!r}")
    return float(density)


class Store:
    """The registry's database: opened (and migrated) at `db_url`, or an embedded SQLite file under `state_dir`;
    one write transaction per logical change. Thread-safe: the control plane calls it from many server threads."""

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
        self._rollout_read: tuple[float, Any] | None = None  # (when, the rollout read then): ROLLOUT_TTL_S

    def _recent_rollout(self, read: Callable[[], T]) -> T:
        """The rollout ``read`` returns, or the one read less than ROLLOUT_TTL_S ago."""
        cached = self._rollout_read
        if cached is not None and time.monotonic() - cached[0] < ROLLOUT_TTL_S:
            return cached[1]  # type: ignore[no-any-return]
        rollout = read()
        self._rollout_read = (time.monotonic(), rollout)
        return rollout

    def _rollout_changed(self) -> None:
        """Versions were published or decided here: the next heartbeat reads the rollout afresh."""
        self._rollout_read = None

    @property
    def safe_url(self) -> str:
        """The database URL with any password masked, for logs and people."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
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

