"""Control-plane load test: N simulated agents heartbeating one server on loopback, SQLite and PostgreSQL.

The agents are asyncio gRPC clients in a child process, so they do not compete for the server's GIL.
Each registers, then heartbeats back to back with a budget that wanders across density boundaries,
until its count or the time runs out. Afterwards every acknowledged heartbeat must be in the registry
with the budget it sent and the density it was answered; the ones that are not are counted as "lost".

    .venv/bin/python -m benchmarks.registry_bench                      # 50 and 200 agents, both databases
    .venv/bin/python -m benchmarks.registry_bench --agents 100 --db sqlite --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

import grpc  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from contracts.credentials import bearer  # noqa: E402
from contracts.settings import RunSettings  # noqa: E402
from coordinator.control_plane import serve  # noqa: E402
from coordinator.registry import Registry  # noqa: E402
from coordinator.registry.engine import make_engine  # noqa: E402
from coordinator.registry.models import BudgetReport  # noqa: E402
from protos.dress.fleet.v1 import control_plane_pb2 as pb  # noqa: E402
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc  # noqa: E402
from runtime.processes import pick_port  # noqa: E402

log = logging.getLogger("registry_bench")

DEFAULT_PG_URL = os.environ.get("DRESS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "registry.json"
DENSITIES = RunSettings.defaults().architecture().densities  # the fleet's: a level indexes them
PROFILES = ("pi4", "pi5", "jetson-nano", "jetson-orin-nano", "phone", "laptop-x86")

Ack = tuple[float, float, float | None, float]  # the budget sent (latency_ms, memory_mb, battery), density answered


# -- agents (child process) -----------------------------------------------------------------------------


class _Window:
    """Start signal and deadline shared by the agents: the clock starts once all have registered."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.deadline = 0.0


async def _agent(index: int, address: str, token: str, window: _Window, max_heartbeats: int,
                 ready: asyncio.Queue[int]) -> tuple[int, list[Ack], list[float], int]:
    """One device: register, wait for the start, heartbeat back to back; returns its acks and latencies."""
    rng = random.Random(index)
    scale = rng.uniform(0.5, 2.0)
    calibration = [pb.CalibrationPoint(level=level, latency_ms=100 * d * scale, memory_mb=800 * d * scale)
                   for level, d in enumerate(DENSITIES)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ControlPlaneStub(channel)
        reply = await stub.Register(pb.RegisterRequest(
            name=f"bench-{index}", profile=PROFILES[index % len(PROFILES)], calibration=calibration),
            metadata=bearer(token))
        credential = bearer(reply.credential)
        ready.put_nowait(index)
        await window.started.wait()
        acks: list[Ack] = []
        latencies: list[float] = []
        errors = 0
        latency_ms, memory_mb = 100.0 * scale, 800.0 * scale
        while len(acks) < max_heartbeats and time.monotonic() < window.deadline:
            latency_ms = min(400.0 * scale, max(5.0 * scale, latency_ms * rng.uniform(0.8, 1.25)))
            memory_mb = min(3200.0 * scale, max(40.0 * scale, memory_mb * rng.uniform(0.8, 1.25)))
            battery = round(rng.random(), 3) if index % 2 else None
            request = pb.HeartbeatRequest(budget=pb.Budget(
                latency_ms=latency_ms, memory_mb=memory_mb, battery=battery))
            sent = time.perf_counter()
            try:
                answer = await stub.Heartbeat(request, timeout=30, metadata=credential)
            except grpc.aio.AioRpcError as e:
                log.warning("agent %d: %s %s", index, e.code(), e.details())
                errors += 1
                continue
            latencies.append(time.perf_counter() - sent)
            acks.append((latency_ms, memory_mb, battery, DENSITIES[answer.level]))
        return reply.device_id, acks, latencies, errors


async def _drive(address: str, tokens: list[str], seconds: float, max_heartbeats: int) -> dict[str, Any]:
    agents = len(tokens)
    window, ready = _Window(), asyncio.Queue[int]()
    tasks = [asyncio.create_task(_agent(i, address, token, window, max_heartbeats, ready))
             for i, token in enumerate(tokens)]
    for _ in range(agents):
        await asyncio.wait_for(ready.get(), timeout=60)
    began = time.monotonic()
    window.deadline = began + seconds
    window.started.set()
    results = await asyncio.gather(*tasks)
    return {"elapsed": time.monotonic() - began, "results": results}


def _agents_process(address: str, tokens: list[str], seconds: float, max_heartbeats: int, pipe: Connection) -> None:
    try:
        pipe.send(asyncio.run(_drive(address, tokens, seconds, max_heartbeats)))
    except BaseException as e:  # report, so the parent fails with the cause instead of waiting
        pipe.send({"error": repr(e)})
        raise
    finally:
        pipe.close()


# -- server side (this process) -------------------------------------------------------------------------


def _no_model(density: float, half: bool) -> bytes:
    raise LookupError("the benchmark serves no model")


@contextlib.contextmanager
def fresh_database(db: str, pg_url: str) -> Iterator[str]:
    """A URL for an empty database: a temp SQLite file, or a PostgreSQL schema dropped afterwards."""
    if db == "sqlite":
        with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
            yield f"sqlite:///{tmp}/registry.sqlite3"
        return
    url = make_url(pg_url)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _count_lost(url: str, results: list[tuple[int, list[Ack], list[float], int]]) -> int:
    """Acknowledged heartbeats whose budget and answered density are not in the registry's history."""
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(BudgetReport.device_id, BudgetReport.latency_ms, BudgetReport.memory_mb,
                                       BudgetReport.battery, BudgetReport.assigned_density))
            stored = collections.Counter(tuple(row) for row in rows)
    finally:
        engine.dispose()
    acked = collections.Counter((device_id, *ack) for device_id, acks, _, _ in results for ack in acks)
    return sum((acked - stored).values())


def _percentile_ms(latencies: list[float], q: int) -> float:
    return round(statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] * 1000, 2)


def run_once(db: str, url: str, agents: int, seconds: float, max_heartbeats: int, max_workers: int,
             pool_size: int) -> dict[str, Any]:
    """One server, `agents` agents in a child process, one fresh database; returns the run's row."""
    with Registry(url, pool_size=pool_size, max_overflow=0) as registry:
        port = pick_port()
        server = serve(registry, "127.0.0.1", port, RunSettings.defaults().architecture(), _no_model,
                       max_workers=max_workers)
        try:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_agents_process,
                                  args=(f"127.0.0.1:{port}", list(registry.enroll(
                                      [f"bench-{i}" for i in range(agents)]).values()), seconds, max_heartbeats,
                                      sender))
            process.start()
            sender.close()
            if not receiver.poll(seconds + 120):
                process.kill()
                raise TimeoutError(f"{db}/{agents}: agents did not finish")
            outcome = receiver.recv()
            process.join()
        finally:
            server.stop(grace=None).wait()
    if "error" in outcome:
        raise RuntimeError(f"{db}/{agents}: agents failed: {outcome['error']}")
    results = outcome["results"]
    latencies = [x for _, _, lat, _ in results for x in lat]
    acked = len(latencies)
    return {
        "db": db,
        "agents": agents,
        "heartbeats_per_s": round(acked / outcome["elapsed"], 1),
        "p50_ms": _percentile_ms(latencies, 50),
        "p99_ms": _percentile_ms(latencies, 99),
        "lost": _count_lost(url, results),
        "heartbeats": acked,
        "errors": sum(e for _, _, _, e in results),
        "seconds": round(outcome["elapsed"], 2),
        "server_workers": max_workers,
        "db_pool": pool_size,
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _pg_reachable(pg_url: str) -> str | None:
    """None if PostgreSQL answers, else why not."""
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        return str(e).strip()
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + os.replace): a crashed run never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[50, 200], help="agent counts to run")
    parser.add_argument("--db", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--seconds", type=float, default=10.0, help="heartbeating time per run")
    parser.add_argument("--max-heartbeats", type=int, default=100_000, help="per agent, per run")
    # SQLite has one writer at a time, so extra server threads only fight over the GIL; PostgreSQL
    # needs heartbeats in flight to overlap their commits' fsyncs.
    parser.add_argument("--sqlite-workers", type=int, default=4, help="server thread pool size on SQLite")
    parser.add_argument("--pg-workers", type=int, default=16, help="server thread pool size on PostgreSQL")
    parser.add_argument("--pool-size", type=int, default=16, help="database connections")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    load_at_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    runs = []
    for db in args.db:
        if db == "postgresql" and (why := _pg_reachable(args.pg_url)):
            print(f"skipping postgresql: {why}", file=sys.stderr)
            continue
        for agents in args.agents:
            with fresh_database(db, args.pg_url) as url:
                workers = args.sqlite_workers if db == "sqlite" else args.pg_workers
                row = run_once(db, url, agents, args.seconds, args.max_heartbeats, workers, args.pool_size)
            print(json.dumps(row), file=sys.stderr)
            runs.append(row)
    command = "python -m benchmarks.registry_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_json(args.out, {"machine": _machine(), "command": command.strip(),
                          "load_avg_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
                          "runs": runs})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
