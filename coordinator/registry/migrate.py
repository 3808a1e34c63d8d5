"""Alembic driven from code: no alembic.ini at run time, so a fresh database just works on open."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from coordinator.registry.engine import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_ALEMBIC_LOCK = threading.Lock()


def alembic_config(db_url: str) -> Config:
    """A Config pointing at coordinator/migrations; the URL travels in attributes, safe from % interpolation."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["db_url"] = db_url
    return config


def upgrade(db_url: str, revision: str = "head") -> None:
    """Bring the database at `db_url` up to `revision` (creating every table on a fresh one).

    Safe to call from several processes at once (env.py serialises them in the database) and from
    several threads (alembic's context is process-global, so threads take turns here).
    """
    with _ALEMBIC_LOCK:
        command.upgrade(alembic_config(db_url), revision)


def current_revision(db_url: str) -> str | None:
    """The revision the database is at, None if it was never migrated."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if head is None:
        raise RuntimeError(f"{MIGRATIONS_DIR} has no revisions")
    return head
