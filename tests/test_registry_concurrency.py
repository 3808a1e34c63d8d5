"""Concurrency: ~100 agents heartbeating one control plane lose nothing, on SQLite and PostgreSQL;
concurrent heartbeats for one device never lose a density change."""

from __future__ import annotations

import collections
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from conftest import DeviceStub
from sqlalchemy import create_engine, select

from contracts.policy import Budget, CalibrationPoint
from contracts.settings import RunSettings
from coordinator.control_plane import serve
from coordinator.registry import AssignmentReason, Registry
from coordinator.registry.models import BudgetReport, DensityAssignment
from protos.dress.fleet.v1 import control_plane_pb2 as pb

AGENTS = 100
HEARTBEATS_PER_AGENT = 10
DENSITIES = RunSettings.defaults().architecture().densities
CALIBRATION = [pb.CalibrationPoint(level=level, latency_ms=100 * d, memory_mb=800 * d) for level, d in enumerate(DENSITIES)]
Ack = tuple[int, float, float, float | None, float]  # device id, budget sent, density answered


def _rows(url: str, *columns: object) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(*columns).order_by(columns[0]))]
    finally:
        engine.dispose()


def _agent(address: str, index: int, token: str, start: threading.Barrier) -> list[Ack]:
    """A device: register, wait for the others, heartbeat with a budget that crosses density boundaries."""
    rng = random.Random(index)
    with grpc.insecure_channel(address) as channel:
        stub = DeviceStub(channel, token)
        device_id = stub.Register(pb.RegisterRequest(name=f"agent-{index}", profile="phone",
                                                     calibration=CALIBRATION)).device_id
        start.wait(timeout=30)
        acks = []
        for _ in range(HEARTBEATS_PER_AGENT):
            latency, memory = rng.uniform(5, 150), rng.uniform(50, 1200)
            battery = rng.choice([None, round(rng.random(), 2)])
            reply = stub.Heartbeat(pb.HeartbeatRequest(budget=pb.Budget(
                latency_ms=latency, memory_mb=memory, battery=battery)), timeout=30)
            acks.append((device_id, latency, memory, battery, DENSITIES[reply.level]))
        return acks


def _assert_history_consistent(url: str) -> None:
    """Per device, in commit order: every density change has its assignment row, and only changes do."""
    assignments = _rows(url, DensityAssignment.id, DensityAssignment.device_id, DensityAssignment.density,
                        DensityAssignment.reason, DensityAssignment.budget_id)
    current = {device: density for _, device, density, reason, _ in assignments
               if reason == AssignmentReason.REGISTRATION}
    change_rows = {budget_id: (device, density) for _, device, density, reason, budget_id in assignments
                   if reason == AssignmentReason.BUDGET_CHANGE}
    expected_changes = {}
    for budget_id, device, density in _rows(url, BudgetReport.id, BudgetReport.device_id,
                                            BudgetReport.assigned_density):
        if density != current[device]:
            expected_changes[budget_id] = (device, density)
        current[device] = density
    assert change_rows == expected_changes


def test_hundred_agents_lose_no_heartbeat(db_url: str, free_port: int) -> None:
    with Registry(db_url, pool_size=8) as registry:
        server = serve(registry, "127.0.0.1", free_port, RunSettings.defaults().architecture(), lambda version, density, half: b"",
                       max_workers=16)
        try:
            start = threading.Barrier(AGENTS)
            with ThreadPoolExecutor(AGENTS) as pool:
                tokens = registry.enroll([f"agent-{i}" for i in range(AGENTS)])
                futures = [pool.submit(_agent, f"127.0.0.1:{free_port}", i, tokens[f"agent-{i}"], start)
                           for i in range(AGENTS)]
                acks = [ack for f in futures for ack in f.result(timeout=60)]
        finally:
            server.stop(grace=None).wait()
        assert len(acks) == AGENTS * HEARTBEATS_PER_AGENT
        stored = collections.Counter(_rows(db_url, BudgetReport.device_id, BudgetReport.latency_ms,
                                           BudgetReport.memory_mb, BudgetReport.battery,
                                           BudgetReport.assigned_density))
        lost = collections.Counter(acks) - stored
        assert not lost, f"{sum(lost.values())} acknowledged heartbeats missing from the registry"
        assert stored.total() == len(acks)
        _assert_history_consistent(db_url)
        last_answer = {device: density for device, *_, density in acks}
        assert {d.id: d.current_density for d in registry.list_devices()} == last_answer


def test_concurrent_heartbeats_for_one_device_lose_no_update(
    db_url: str, calibration: list[CalibrationPoint]
) -> None:
    """Many threads, one device, budgets flipping across a boundary: without the row lock two heartbeats
    would both see the old density and both record the same change."""
    threads, beats = 16, 25
    with Registry(db_url, pool_size=threads) as registry:
        device = registry.register_device("busy", "pi4", calibration).device_id
        start = threading.Barrier(threads)

        def hammer(index: int) -> None:
            start.wait(timeout=30)
            for k in range(beats):
                registry.heartbeat(device, Budget(200 if (index + k) % 2 else 30, 4000))

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(hammer, i) for i in range(threads)]:
                future.result(timeout=60)
        assert len(_rows(db_url, BudgetReport.id)) == threads * beats
        _assert_history_consistent(db_url)
        last_budget_density = _rows(db_url, BudgetReport.id, BudgetReport.assigned_density)[-1][1]
        assert registry.get_device(device).current_density == last_budget_density
        assert registry.device_history(device)[-1].density == last_budget_density
