"""Engines tuned per backend: SQLite gets WAL and write-locking transactions, PostgreSQL a sized pool."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry

from runtime.certificates import write_private

SQLITE_FILENAME = "registry.sqlite3"
URL_FILENAME = "registry.url"  # the registry URL a coordinator saved in its state directory (save_url)
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option for read-only work on SQLite: a deferred BEGIN, so readers never queue behind writers.
READ_ONLY = "dress_read_only"


def default_url(state_dir: Path | str) -> str:
    """The registry of the coordinator whose state directory this is: the URL it saved there (save_url), else
    the embedded default, one SQLite file in the state directory, created on demand."""
    path = Path(state_dir)
    if (saved := path / URL_FILENAME).is_file():
        return saved.read_text().strip()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / SQLITE_FILENAME).resolve()}"


def save_url(state_dir: Path, url: str | None) -> None:
    """Keep the registry URL beside the state (0600: it may hold a database password), so the ServerApp and the
    operator's commands find it from the state directory alone; None: the embedded SQLite default."""
    path = state_dir / URL_FILENAME
    if url:
        write_private(path, url.encode())
    else:
        path.unlink(missing_ok=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10, **kwargs: Any) -> Engine:
    """An engine for `url`; on SQLite every write transaction takes the database lock up front.

    BEGIN IMMEDIATE makes a read-then-write transaction (like a heartbeat) wait for the lock instead of
    failing half-way with SQLITE_BUSY, and the busy timeout makes other processes (the CLI) wait too.
    """
    if "poolclass" not in kwargs:
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    if not is_sqlite(url):
        # No pool_pre_ping: it costs a round trip per transaction. A connection that died (server
        # restart) fails one transaction, which rolls back whole and invalidates the pool.
        return create_engine(url, **kwargs)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # the driver must not BEGIN on its own; the event below does
        # synchronous=NORMAL in WAL mode: an app crash loses nothing, a power cut at most the last commits.
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine
