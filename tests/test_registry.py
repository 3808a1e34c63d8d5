"""Registry repository API on SQLite and PostgreSQL: records, history, validation, all-or-nothing writes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from contracts.policy import Budget, CalibrationPoint
from coordinator.registry import (
    AssignmentReason,
    DeviceNotFoundError,
    DeviceStatus,
    InvalidInputError,
    Registry,
    devices,
)
from coordinator.registry.models import BudgetReport, DensityAssignment, Device


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    with Registry(db_url) as registry:
        yield registry


def _count(url: str, table: type) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(table))
    finally:
        engine.dispose()


def test_default_is_sqlite_in_state_dir_in_wal_mode(tmp_path: Path, calibration: list[CalibrationPoint]) -> None:
    state = tmp_path / "state"
    with Registry(state_dir=state) as registry:
        registry.register_device("pi", "pi4", calibration)
    db_file = state / "registry.sqlite3"
    assert db_file.exists()
    engine = create_engine(f"sqlite:///{db_file}")
    with engine.connect() as conn:
        assert conn.scalar(text("PRAGMA journal_mode")) == "wal"
    engine.dispose()
    with Registry(state_dir=state) as reopened:  # reopening keeps the data, migrations are a no-op
        assert [d.name for d in reopened.list_devices()] == ["pi"]


def test_register_then_heartbeats_record_budgets_and_density_changes(
    registry: Registry, db_url: str, calibration: list[CalibrationPoint]
) -> None:
    first = registry.register_device("jetson-1", "jetson-nano", calibration)
    registry.bind_flower_nodes({"jetson-1": 2**63 + 5})  # what the ServerApp learns by its status query
    # jetson-nano's tightest typical budget, 50 ms / 512 MB: 0.5 fits
    assert (first.density, first.changed, first.model_version) == (0.5, True, None)
    registry.add_model_version("v1", "/ckpt/v1", [1.0, 0.5, 0.25, 0.1])

    budgets = [Budget(200, 2000), Budget(200, 2000, 1.0), Budget(20, 2000), Budget(21, 2000), Budget(5, 50)]
    answers = [registry.heartbeat(first.device_id, b) for b in budgets]
    assert [(a.density, a.changed) for a in answers] == [(1.0, True), (1.0, False), (0.1, True), (0.1, False),
                                                         (0.1, False)]
    assert {a.model_version for a in answers} == {"v1"}
    assert registry.get_device(first.device_id).current_density == 0.1

    history = registry.device_history(first.device_id)
    assert [(h.density, h.reason, h.budget) for h in history] == [
        (0.5, AssignmentReason.REGISTRATION, None),
        (1.0, AssignmentReason.BUDGET_CHANGE, Budget(200, 2000)),
        (0.1, AssignmentReason.BUDGET_CHANGE, Budget(20, 2000)),
    ]
    assert [h.model_version for h in history] == [None, "v1", "v1"]
    assert all(h.assigned_at.tzinfo is UTC for h in history)
    assert _count(db_url, BudgetReport) == len(budgets)  # every heartbeat's budget, changed or not

    [device] = registry.list_devices()
    assert (device.name, device.profile, device.status, device.current_density) == (
        "jetson-1", "jetson-nano", DeviceStatus.ONLINE, 0.1)
    assert device.flower_node_id == 2**63 + 5  # full uint64 range survives a signed BIGINT
    assert device.last_budget == Budget(5, 50)
    assert device.first_seen <= device.last_seen and device.last_seen.tzinfo is UTC


def test_reregistration_keeps_id_and_history(registry: Registry, calibration: list[CalibrationPoint]) -> None:
    first = registry.register_device("pi", "pi4", calibration)
    registry.heartbeat(first.device_id, Budget(1000, 4000))
    again = registry.register_device("pi", "pi5", calibration[1:])
    assert again.device_id == first.device_id
    assert again.density == 0.5 and again.changed  # pi5's tightest budget, 80 ms / 512 MB, on the new table
    [device] = registry.list_devices()
    assert device.profile == "pi5"
    assert [h.reason for h in registry.device_history(first.device_id)] == [
        AssignmentReason.REGISTRATION, AssignmentReason.BUDGET_CHANGE, AssignmentReason.REGISTRATION]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 200}, "name"),
        ({"profile": "toaster"}, "unknown device profile 'toaster'; valid profiles: jetson-nano"),
        ({"calibration": []}, "empty"),
    ],
)
def test_bad_registrations_store_nothing(registry: Registry, db_url: str, calibration: list[CalibrationPoint],
                                         kwargs: dict, message: str) -> None:
    args = {"name": "pi", "profile": "pi4", "calibration": calibration} | kwargs
    with pytest.raises(InvalidInputError, match=message):
        registry.register_device(**args)
    assert _count(db_url, Device) == 0


def test_unknown_device(registry: Registry) -> None:
    for call in (
        lambda: registry.heartbeat(7, Budget(10, 10)),
        lambda: registry.assign(7, 0.5),
        lambda: registry.get_device(7),
        lambda: registry.device_history(7),
        lambda: registry.calibrated_densities(7),
        lambda: registry.set_status([7], DeviceStatus.DRAINING),
        lambda: registry.record_round(1, {7: 0.5}, {}, 0, 0),
    ):
        with pytest.raises(DeviceNotFoundError, match="7"):
            call()


def test_operator_and_training_assignments(registry: Registry, calibration: list[CalibrationPoint]) -> None:
    device = registry.register_device("phone", "phone", calibration).device_id
    assert registry.assign(device, 0.25).changed
    same = registry.assign(device, 0.25, AssignmentReason.TRAINING_ASSIGNMENT)
    assert (same.density, same.changed) == (0.25, False)
    assert [h.reason for h in registry.device_history(device)][1:] == [
        AssignmentReason.OPERATOR, AssignmentReason.TRAINING_ASSIGNMENT]
    with pytest.raises(InvalidInputError, match="not calibrated at density 0.3"):
        registry.assign(device, 0.3)
    with pytest.raises(InvalidInputError, match=r"\(0, 1\]"):
        registry.assign(device, 1.5)
    with pytest.raises(InvalidInputError, match="budget_change"):
        registry.assign(device, 0.5, AssignmentReason.BUDGET_CHANGE)
    # the assignment holds while it fits: the heartbeat's hysteresis treats it as the current density
    assert registry.heartbeat(device, Budget(30, 2000)).density == 0.25
    assert registry.get_device(device).current_density == 0.25


def test_status_draining_survives_heartbeats_and_offline_comes_back(
    registry: Registry, calibration: list[CalibrationPoint]
) -> None:
    a = registry.register_device("a", "pi4", calibration).device_id
    b = registry.register_device("b", "pi4", calibration).device_id
    registry.set_status([a], DeviceStatus.DRAINING)
    registry.heartbeat(a, Budget(1000, 4000))
    assert registry.mark_offline(timedelta(hours=1)) == 0
    assert registry.mark_offline(timedelta(0)) == 1  # b: online and silent; a is draining
    statuses = {d.id: d.status for d in registry.list_devices()}
    assert statuses == {a: DeviceStatus.DRAINING, b: DeviceStatus.OFFLINE}
    registry.heartbeat(b, Budget(1, 1))
    assert {d.id: d.status for d in registry.list_devices()}[b] == DeviceStatus.ONLINE


def test_rounds_and_model_versions(registry: Registry, calibration: list[CalibrationPoint]) -> None:
    a = registry.register_device("a", "pi4", calibration).device_id
    b = registry.register_device("b", "laptop-x86", calibration).device_id
    assert registry.current_model_version() is None
    registry.add_model_version("v1", "/ckpt/v1.safetensors", [0.5, 1.0, 0.5])
    registry.add_model_version("v2", "/ckpt/v2.safetensors", [1.0])
    assert registry.current_model_version() == "v2"
    with pytest.raises(InvalidInputError, match="already exists"):
        registry.add_model_version("v1", "/elsewhere", [1.0])
    with pytest.raises(InvalidInputError, match="at least one density"):
        registry.add_model_version("v3", "/x", [])

    assert registry.count_rounds() == 0
    registry.record_round(1, {a: 0.25, b: 1.0}, {0.25: {"accuracy": 0.71}, 1.0: {"accuracy": 0.9}}, 1000, 2000)
    registry.record_round(2, {b: 1.0}, {1.0: {"loss": 0.3}}, 10, 20, model_version="v1")
    with pytest.raises(InvalidInputError, match="round 2 already recorded"):
        registry.record_round(2, {}, {}, 0, 0)
    with pytest.raises(InvalidInputError, match="finite"):
        registry.record_round(3, {}, {1.0: {"loss": float("inf")}}, 0, 0)
    first, second = registry.list_rounds()
    assert registry.count_rounds() == 2
    assert (first.round, first.participants, first.metrics, first.bytes_sent, first.bytes_received) == (
        1, {a: 0.25, b: 1.0}, {0.25: {"accuracy": 0.71}, 1.0: {"accuracy": 0.9}}, 1000, 2000)
    assert (first.model_version, second.model_version) == ("v2", "v1")
    # what a live view asks: the rounds after the last it has, a page at a time
    assert [r.round for r in registry.list_rounds(after=1)] == [2]
    assert [r.round for r in registry.list_rounds(limit=1)] == [1]
    assert registry.list_rounds(after=2) == []


def test_failed_heartbeat_leaves_nothing_half_written(
    registry: Registry, db_url: str, calibration: list[CalibrationPoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the budget insert rolls the whole heartbeat back: no budget, no assignment."""
    device = registry.register_device("pi", "pi4", calibration).device_id
    # the assignment insert (after the budget insert) fails
    monkeypatch.setattr(devices, "_INSERT_ASSIGNMENT", text("INSERT INTO no_such_table VALUES (1)"))
    with pytest.raises(DBAPIError, match="no_such_table"):
        registry.heartbeat(device, Budget(1000, 4000))
    assert _count(db_url, BudgetReport) == 0
    assert _count(db_url, DensityAssignment) == 1  # the registration only
    assert registry.get_device(device).current_density == 0.25


def test_flower_node_ids_must_be_uint64(registry: Registry, calibration: list[CalibrationPoint]) -> None:
    registry.register_device("pi", "pi4", calibration)
    for bad in (-1, 2**64):
        with pytest.raises(InvalidInputError, match="uint64"):
            registry.bind_flower_nodes({"pi": bad})
    assert registry.list_devices()[0].flower_node_id is None


def test_a_whole_fleet_goes_offline_in_one_call(registry: Registry, calibration: list[CalibrationPoint]) -> None:
    ids = [registry.register_device(f"sim-{i:03d}", "pi4", calibration).device_id for i in range(5)]
    registry.set_status(ids[:3], DeviceStatus.OFFLINE)
    assert [d.status for d in registry.list_devices()] == [DeviceStatus.OFFLINE] * 3 + [DeviceStatus.ONLINE] * 2
