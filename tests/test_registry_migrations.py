"""Alembic migrations: a fresh database upgrades to head and then matches the models exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from coordinator.registry.migrate import alembic_config, current_revision, head_revision, upgrade
from coordinator.registry.models import Base

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = {"devices", "budgets", "density_assignments", "training_rounds", "model_versions", "enrollments",
          "operators",
          "round_starts", "version_checks"}


def _schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_fresh_database_upgrades_to_head_matching_models(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() == "0008"
    assert _tables(db_url) == TABLES == set(Base.metadata.tables)
    assert _schema_diff(db_url) == []  # the hand-tidied revision creates exactly what the models declare
    upgrade(db_url)  # idempotent
    assert current_revision(db_url) == "0008"


def test_downgrade_to_base_and_back(db_url: str) -> None:
    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "base")
    assert current_revision(db_url) is None and _tables(db_url) == set()
    upgrade(db_url)
    assert _schema_diff(db_url) == []


def test_offline_sql_renders_for_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    """`alembic upgrade --sql` works too, for DBAs who apply migrations by hand."""
    command.upgrade(alembic_config("postgresql+psycopg://nobody@nowhere/none"), "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE devices" in sql and "CHECK (status IN ('online', 'offline', 'draining'))" in sql


def test_concurrent_first_opens_do_not_collide(db_url: str) -> None:
    """The coordinator and a CLI may open a fresh database at the same moment, from separate processes."""
    script = "import sys; from coordinator.registry.migrate import upgrade; upgrade(sys.argv[1])"
    processes = [subprocess.Popen([sys.executable, "-c", script, db_url], cwd=REPO_ROOT, stderr=subprocess.PIPE)
                 for _ in range(3)]
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr.decode()
    assert current_revision(db_url) == head_revision()
    assert _schema_diff(db_url) == []
