"""Simulated budgets: trace families, trace files, profile-true budgets and the round-indexed fleet driver."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from contracts.policy import CalibrationPoint, choose_density, validate_calibration
from contracts.profiles import load_profiles
from coordinator.control_plane import serve
from coordinator.registry import Registry
from dress_model.models import architecture_for_dataset
from simulations.fleet import FleetDriver, build_fleet, device_budget, fleet_deadline_ms, heartbeats
from simulations.traces import (
    DIURNAL_PERIOD,
    FAMILIES,
    LOW_BATTERY,
    MIXED,
    TracePoint,
    at,
    check_traces,
    fleet_traces,
    make_trace,
    read_trace_csv,
)

PROFILES = load_profiles()
ARCH = architecture_for_dataset("cnn", "1,0.5,0.25,0.1", "fashion-mnist", 4)
PHONE, PI4, LAPTOP = PROFILES["phone"], PROFILES["pi4"], PROFILES["laptop-x86"]
# This machine's packed-model cost per density: 10 ms dense, 3 ms at 0.1.
MEASURED = [CalibrationPoint(1.0, 10.0, 8.0), CalibrationPoint(0.5, 6.0, 4.0),
            CalibrationPoint(0.25, 4.0, 2.0), CalibrationPoint(0.1, 3.0, 1.0)]
HEADER = "trace,round,available,memory_share,battery,online\n"


@pytest.mark.parametrize("family", [f for f in (*FAMILIES, MIXED) if f != "constant"])
def test_families_are_seeded_and_in_range(family: str) -> None:
    trace = make_trace(family, PHONE, 60, seed=3, dropout=0.0)
    assert len(trace) == 61
    assert trace == make_trace(family, PHONE, 60, seed=3, dropout=0.0)
    assert trace != make_trace(family, PHONE, 60, seed=4, dropout=0.0)
    for p in trace:
        assert 0 < p.available <= 1 and 0 < p.memory_share <= 1 and p.online
        assert p.battery is None or 0 <= p.battery <= 1


def test_constant_keeps_every_device_at_its_whole_budget_whatever_the_seed() -> None:
    """What paired comparisons run on: the same budgets for every method, round and seed."""
    trace = make_trace("constant", PHONE, 30, seed=3, dropout=0.0)
    assert trace == make_trace("constant", PHONE, 30, seed=9, dropout=0.0)
    assert {(p.available, p.memory_share, p.online) for p in trace} == {(1.0, 1.0, True)}


def test_steady_stays_nearly_idle() -> None:
    assert all(0.9 <= p.available <= 1.0 and p.battery is None for p in make_trace("steady", PI4, 50, 1, 0.0))


def test_diurnal_repeats_each_day_and_takes_up_to_70_percent() -> None:
    trace = make_trace("diurnal", PI4, 3 * DIURNAL_PERIOD, seed=5, dropout=0.0)
    for r in range(2 * DIURNAL_PERIOD):
        later = trace[r + DIURNAL_PERIOD]
        assert (later.available, later.memory_share) == pytest.approx((trace[r].available, trace[r].memory_share))
    day = [p.available for p in trace[:DIURNAL_PERIOD]]
    assert min(day) >= 0.3 - 1e-9 and max(day) <= 1.0 and max(day) - min(day) > 0.6
    phases = {make_trace("diurnal", PI4, 10, seed=s, dropout=0.0)[0].available for s in range(5)}
    assert len(phases) == 5  # a random phase per device


def test_bursty_has_both_states() -> None:
    trace = make_trace("bursty", PI4, 200, seed=2, dropout=0.0)
    busy = [p for p in trace if p.available <= 0.5]
    idle = [p for p in trace if p.available >= 0.9]
    assert busy and idle and len(busy) + len(idle) == len(trace)
    assert all(0.2 <= p.available for p in busy)
    assert max(p.memory_share for p in busy) < min(p.memory_share for p in idle)  # the app takes memory too


def test_battery_drains_and_low_charge_saves_power() -> None:
    trace = make_trace("battery", PHONE, 150, seed=9, dropout=0.0)
    levels = [p.battery for p in trace]
    assert all(level is not None for level in levels)
    assert all(a >= b for a, b in zip(levels, levels[1:])) and levels[0] > levels[-1] == 0.0
    low = [p for p in trace if p.battery is not None and p.battery < LOW_BATTERY]
    assert max(p.available for p in low if p.battery == 0.0) <= 0.25  # empty: a quarter of the compute
    assert all(p.available >= 0.9 for p in trace if p.battery is not None and p.battery >= LOW_BATTERY)


def test_battery_family_without_a_battery_runs_steady() -> None:
    assert make_trace("battery", PI4, 30, seed=9, dropout=0.0) == make_trace("steady", PI4, 30, seed=9, dropout=0.0)


def test_mixed_draws_battery_only_for_battery_profiles() -> None:
    phones = [make_trace("mixed", PHONE, 30, seed=s, dropout=0.0) for s in range(40)]
    pis = [make_trace("mixed", PI4, 30, seed=s, dropout=0.0) for s in range(40)]
    assert any(p.battery is not None for t in phones for p in t)
    assert all(p.battery is None for t in pis for p in t)
    assert any(all(p.battery is None for p in t) for t in phones)  # phones draw the other families too


def test_dropout_is_an_offline_window_of_a_few_rounds() -> None:
    for seed in range(20):
        offline = [r for r, p in enumerate(make_trace("steady", PI4, 30, seed, dropout=1.0)) if not p.online]
        assert 2 <= len(offline) <= 4 and offline == list(range(offline[0], offline[0] + len(offline)))
        assert offline[0] >= 1  # round 1 always starts with the device online
    assert all(p.online for p in make_trace("steady", PI4, 30, seed=1, dropout=0.0))


def test_point_in_force_holds_the_last_past_the_end() -> None:
    trace = make_trace("diurnal", PI4, 5, seed=1, dropout=0.0)
    assert at(trace, 0) == trace[0] and at(trace, 3) == trace[3] and at(trace, 99) == trace[5]


def test_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown trace family 'steddy'.*steady"):
        check_traces("steddy")
    with pytest.raises(ValueError, match="unknown trace family 'sunny'"):
        make_trace("sunny", PI4, 3, seed=1, dropout=0.0)


# -- trace files -------------------------------------------------------------------------------------------


def test_csv_traces_hold_gaps_and_go_round_robin(tmp_path: Path) -> None:
    path = tmp_path / "traces.csv"
    path.write_text(HEADER + "b,0,1.0,1.0,,1\n"
                             "a,2,0.25,0.5,0.2,false\n"
                             "a,0,0.5,0.9,0.9,true\n"
                             "b,1,0.3,0.4,,0\n")  # fmt: skip
    traces = read_trace_csv(path)
    assert traces["a"] == [TracePoint(0.5, 0.9, 0.9, True), TracePoint(0.5, 0.9, 0.9, True),
                           TracePoint(0.25, 0.5, 0.2, False)]
    assert traces["b"] == [TracePoint(1.0, 1.0, None, True), TracePoint(0.3, 0.4, None, False)]
    check_traces(str(path))
    fleet = fleet_traces(str(path), [PI4] * 3, rounds=10, seed=1, dropout=1.0)
    assert fleet == [traces["a"], traces["b"], traces["a"]]  # device i: id i mod 2, in sorted order; no dropout
    assert at(fleet[0], 7) == TracePoint(0.25, 0.5, 0.2, False)


@pytest.mark.parametrize(
    "text,message",
    [
        ("trace,round,available,battery,online\na,0,1,,1\n", ":1: header lacks column(s) memory_share"),
        (HEADER + "a,0,1,1,,1\na,1,fast,1,,1\n", ":3: available must be a number, got 'fast'"),
        (HEADER + "a,0,0,1,,1\n", ":2: available must be in (0, 1], got '0'"),
        (HEADER + "a,0,1.5,1,,1\n", ":2: available must be in (0, 1], got '1.5'"),
        (HEADER + "a,0,1,1,1.2,1\n", ":2: battery must be in [0, 1]"),
        (HEADER + "a,0,1,1,,maybe\n", ":2: online must be 0, 1, true or false, got 'maybe'"),
        (HEADER + "a,x,1,1,,1\n", ":2: round must be a whole number >= 0, got 'x'"),
        (HEADER + "a,0,1,1,,1\na,0,1,1,,1\n", ":3: trace 'a' lists round 0 twice"),
        (HEADER + "a,0,1,1\n", ":2: expected 6 values"),
        (HEADER, "has a header but no rows"),
        ("", "is empty"),
    ],
)
def test_bad_csv_names_file_line_and_expectation(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        check_traces(str(path))
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_missing_csv_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read trace file .*nope.csv"):
        check_traces(str(tmp_path / "nope.csv"))


# -- profile-true budgets ------------------------------------------------------------------------------------


def _chosen(profile_name: str, point: TracePoint, headroom: float = 1.5) -> float:
    [device] = build_fleet([PROFILES[profile_name]], MEASURED, [[point]])
    budget = device_budget(device.profile, point, fleet_deadline_ms(MEASURED, headroom))
    return choose_density(validate_calibration(device.calibration), budget)


def test_budgets_are_true_to_the_profile() -> None:
    idle = TracePoint(0.95, 0.9, None, True)
    assert _chosen("laptop-x86", idle) == 1.0  # the reference device meets 1.5x its own full latency
    assert _chosen("jetson-orin-nano", idle) == 1.0
    assert _chosen("phone", idle) == 0.5  # twice as slow: 12 ms at 0.5 fits 14 ms
    assert _chosen("pi4", idle) == 0.1  # 12.5x slower: nothing fits, the sparsest is the least bad
    busy = TracePoint(0.3, 0.9, None, True)
    assert _chosen("laptop-x86", busy) == 0.25  # 4.5 ms left: the laptop steps down too
    assert _chosen("laptop-x86", idle, headroom=0.25) == 0.1  # a deadline below every subnet's cost


def test_budget_memory_and_battery_come_from_profile_and_trace() -> None:
    point = TracePoint(0.5, 0.25, 0.4, True)
    phone = device_budget(PHONE, point, deadline_ms=20.0)
    assert (phone.latency_ms, phone.memory_mb, phone.battery) == (10.0, PHONE.memory_mb * 0.25, 0.4)
    assert device_budget(PI4, point, deadline_ms=20.0).battery is None  # a Pi has no battery to report


def test_heartbeats_use_the_point_of_the_completed_round_count() -> None:
    trace = [TracePoint(1.0, 1.0, None, True), TracePoint(0.5, 1.0, None, True), TracePoint(0.2, 1.0, None, False)]
    fleet = build_fleet([LAPTOP, PI4], MEASURED, [trace, [TracePoint(0.8, 1.0, None, True)]])
    assert [(d.name, b.latency_ms) for d, b in heartbeats(fleet, 1, 10.0)] == [(fleet[0].name, 5.0),
                                                                                (fleet[1].name, 8.0)]
    assert [d for d, _ in heartbeats(fleet, 2, 10.0)] == [fleet[1]]  # offline in its window: silent
    assert [d for d, _ in heartbeats(fleet, 9, 10.0)] == [fleet[1]]  # past the end the last point holds


@pytest.fixture
def registry(sqlite_url: str) -> Iterator[Registry]:
    with Registry(sqlite_url) as registry:
        yield registry


def test_driver_applies_the_next_point_when_a_round_completes(registry: Registry, free_port: int) -> None:
    server = serve(registry, "127.0.0.1", free_port, ARCH, lambda version, density, half: b"")
    trace = [TracePoint(1.0, 1.0, None, True), TracePoint(0.3, 1.0, None, True)]
    [device] = build_fleet([LAPTOP], MEASURED, [trace])
    completed = [0]
    # A long interval: only a change of the completed-round count can move the density.
    driver = FleetDriver([device], ARCH.densities, f"127.0.0.1:{free_port}", lambda: completed[0],
                         fleet_deadline_ms(MEASURED, 1.5), interval_s=60.0, poll_s=0.05)
    try:
        driver.register(registry.enroll([device.name]), timeout_s=10)
        driver.start()
        assert registry.get_device(device.device_id).current_density == 1.0  # point 0, before round 1
        completed[0] = 1
        deadline = time.monotonic() + 5
        while registry.get_device(device.device_id).current_density != 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.get_device(device.device_id).current_density == 0.25  # point 1: 4.5 ms
    finally:
        driver.stop()
        server.stop(grace=None).wait()


@contextlib.contextmanager
def driven_fleet(registry: Registry, port: int, traces: list[list[TracePoint]],
                 **driver_options: int) -> Iterator[tuple[FleetDriver, grpc.Server]]:
    """A control plane on ``port`` and a registered virtual laptop per trace; both stopped afterwards."""
    server = serve(registry, "127.0.0.1", port, ARCH, lambda version, density, half: b"")
    fleet = build_fleet([LAPTOP] * len(traces), MEASURED, traces)
    for i, device in enumerate(fleet):
        device.name = f"sim-{i:05d}"
    driver = FleetDriver(fleet, ARCH.densities, f"127.0.0.1:{port}", lambda: 0, fleet_deadline_ms(MEASURED, 1.5), interval_s=60.0,
                         **driver_options)
    try:
        driver.register(registry.enroll([d.name for d in fleet]), timeout_s=10)
        yield driver, server
    finally:
        driver.stop()
        server.stop(grace=None).wait()


def test_driver_heartbeats_many_devices_concurrently_and_counts_losses(registry: Registry, free_port: int) -> None:
    with driven_fleet(registry, free_port, [[TracePoint(1.0, 1.0, None, True)]] * 150, in_flight=16) as (driver, server):
        driver.tick(0)
        summary = driver.stats.summary()
        assert summary["answered"] == 150 and summary["lost"] == 0
        assert 0 < summary["p50_ms"] <= summary["p99_ms"] and summary["per_s"] > 0
        assert summary["max_gap_s"] == 0  # a first heartbeat has no gap
        before = time.perf_counter()
        driver.tick(0)
        assert len(driver.stats.gaps_s) == 150  # the second sweep: one gap per online device
        assert 0 < driver.stats.summary()["max_gap_s"] <= time.perf_counter() - before + 5
        server.stop(grace=None).wait()
        driver.tick(0)  # nobody answers now: every heartbeat is lost, none is counted as answered
        assert driver.stats.summary()["lost"] == 150 and driver.stats.summary()["answered"] == 300


def test_a_device_back_from_its_offline_window_starts_a_new_gap_series(registry: Registry, free_port: int) -> None:
    """Silence the trace asked for is not the control plane falling behind: no gap spans an offline window."""
    on, off = TracePoint(1.0, 1.0, None, True), TracePoint(1.0, 1.0, None, False)
    with driven_fleet(registry, free_port, [[on, off, on], [on, on, on]]) as (driver, _):
        for completed in range(3):
            driver.tick(completed)
        assert driver.stats.summary()["answered"] == 5
        assert len(driver.stats.gaps_s) == 2  # both from the device that never went offline
