"""Shared fixtures: isolated registry databases (SQLite files, PostgreSQL schemas) and a running control plane.

PostgreSQL tests run in a database created for this test session (dropped at the end), each test in its
own schema, so they are repeatable and never see another run's rows. They are skipped only when the
server cannot be reached; DRESS_TEST_PG_URL points them elsewhere.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from kernel_cases import isa  # noqa: F401 - the kernel tests' fixture, kept with their cases (tests/aarch64)
from sqlalchemy.engine import URL, make_url

from contracts.credentials import with_bearer
from contracts.policy import CalibrationPoint
from dress_model.models import Architecture, architecture_for_dataset
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc
from runtime.processes import pick_port  # re-exported: tests import it from here

PG_URL = os.environ.get("DRESS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _libpq_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[URL]:
    """A fresh PostgreSQL database for this test session."""
    admin_url = make_url(PG_URL)
    try:
        admin = psycopg.connect(_libpq_dsn(admin_url), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL unreachable at {admin_url.render_as_string(hide_password=True)}: {e}".strip())
    name = f"dress_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.set(database=name)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: URL) -> Iterator[str]:
    """A URL whose tables land in a schema of their own, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq_dsn(pg_database), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield pg_database.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
                hide_password=False)
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def calibration() -> list[CalibrationPoint]:
    """A device whose cost scales with density: 100 ms / 800 MB dense, 10 ms / 80 MB at 0.1."""
    return [CalibrationPoint(d, 100 * d, 800 * d) for d in (1.0, 0.5, 0.25, 0.1)]


@pytest.fixture
def free_port() -> int:
    return pick_port()


@pytest.fixture
def port_factory() -> Callable[[], int]:
    """For tests that need several ports."""
    return pick_port


def architecture(model: str, densities: str, dataset: str, width: int) -> Architecture:
    """A fleet's model, as a coordinator's settings make it."""
    return architecture_for_dataset(model, densities, dataset, width)


class DeviceStub:
    """A device's view of the control plane: it presents its enrollment token until Register answers its
    credential, then that credential, as an agent does (contracts.credentials.with_bearer)."""

    def __init__(self, channel: grpc.Channel, secret: str | None) -> None:
        self.secret = secret
        self._stub = pb_grpc.ControlPlaneStub(with_bearer(channel, lambda: self.secret))

    def Register(self, request: pb.RegisterRequest, **kwargs: Any) -> pb.RegisterResponse:  # noqa: N802 (gRPC name)
        reply = self._stub.Register(request, **kwargs)
        if reply.credential:
            self.secret = reply.credential
        return reply

    def __getattr__(self, method: str) -> Any:
        return getattr(self._stub, method)


def enrolled(channel: grpc.Channel, registry: Any, name: str) -> DeviceStub:
    """A new device ``name``, enrolled by the operator and holding its token, not yet registered."""
    return DeviceStub(channel, registry.enroll([name])[name])




def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "the condition",
          every: float = 0.01) -> float:
    """Seconds until ``condition()`` holds, asked every ``every`` s; fails the test after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"no {what} within {timeout:g} s"
        time.sleep(every)
    return time.monotonic() - started
