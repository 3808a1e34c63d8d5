"""Alembic environment: the registry models' metadata, and our engine so SQLite gets its pragmas and locking."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from coordinator.registry.engine import make_engine
from coordinator.registry.models import Base

config = context.config
target_metadata = Base.metadata


def _db_url() -> str:
    url = config.attributes.get("db_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use coordinator.registry.migrate.alembic_config(db_url)")
    return url


def _run(connection: Connection) -> None:
    """Every step and the version reads in one transaction, begun here, before alembic looks at anything.

    Alembic treats SQLite as non-transactional DDL and would commit after each revision; a second
    process could then read the version between two of them and apply the same revision again. An
    outer transaction (BEGIN IMMEDIATE on SQLite, so the write lock is taken up front) makes alembic
    run inside it and the whole upgrade atomic.
    """
    with connection.begin():
        if connection.dialect.name == "postgresql":
            # Processes opening a fresh database at once: the others wait here, then find it at head.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('dress-fleet registry migrations'))")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite can only ALTER by copying tables
            compare_type=True,
        )
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_db_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_db_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
