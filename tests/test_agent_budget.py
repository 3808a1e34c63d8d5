"""Budget sources: trace files (good and every malformed kind) and the real machine through psutil."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.budget import BudgetTraceError, MachineBudget, TraceBudget, TracePoint
from contracts.policy import Budget
from contracts.profiles import get_profile


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_trace_steps_through_its_points(tmp_path: Path) -> None:
    path = _write(tmp_path, "trace.csv", "t_s,latency_ms,memory_mb,battery\n0,500,1024,0.9\n10,200,256,\n\n30,50,128,0.2\n")
    clock = FakeClock()
    trace = TraceBudget.from_file(path, clock)
    assert trace.current() == Budget(500, 1024, 0.9)  # the first reading starts the trace's clock
    clock.now += 9.99
    assert trace.current() == Budget(500, 1024, 0.9)
    clock.now += 0.01
    assert trace.current() == Budget(200, 256, None)  # an empty battery cell: mains power
    clock.now += 25
    assert trace.current() == Budget(50, 128, 0.2)
    clock.now += 1e6
    assert trace.current() == Budget(50, 128, 0.2)  # the last point holds


def test_json_trace_and_a_first_point_after_zero(tmp_path: Path) -> None:
    entries = [{"t_s": 5, "latency_ms": 100, "memory_mb": 512},
               {"t_s": 8.5, "latency_ms": 20.5, "memory_mb": 64, "battery": None}]
    clock = FakeClock()
    trace = TraceBudget.from_file(_write(tmp_path, "trace.json", json.dumps(entries)), clock)
    assert trace.current() == Budget(100, 512)  # before the first point's time, the first point holds
    clock.now += 8.5
    assert trace.current() == Budget(20.5, 64)


def test_format_is_sniffed_without_a_known_suffix(tmp_path: Path) -> None:
    as_json = _write(tmp_path, "a.trace", '[{"t_s": 0, "latency_ms": 1, "memory_mb": 2}]')
    as_csv = _write(tmp_path, "b.trace", "t_s,latency_ms,memory_mb\n0,1,2\n")
    assert TraceBudget.from_file(as_json).current() == TraceBudget.from_file(as_csv).current() == Budget(1, 2)


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("empty.csv", "", "is empty; expected a CSV header t_s,latency_ms,memory_mb[,battery]"),
    ("header.csv", "time,latency,memory\n0,1,2\n", "header.csv:1: header must be"),
    ("only-header.csv", "t_s,latency_ms,memory_mb\n", "has a header but no points"),
    ("columns.csv", "t_s,latency_ms,memory_mb\n0,1,2\n5,1\n", "columns.csv:3: expected 3 values"),
    ("number.csv", "t_s,latency_ms,memory_mb\n0,fast,2\n", "number.csv:2: expected numbers"),
    ("negative.csv", "t_s,latency_ms,memory_mb\n-1,1,2\n", "negative.csv:2: t_s must be a finite number"),
    ("order.csv", "t_s,latency_ms,memory_mb\n0,1,2\n10,1,2\n10,3,4\n", "order.csv:4: t_s 10 is not after"),
    ("budget.csv", "t_s,latency_ms,memory_mb\n0,0,2\n", "budget.csv:2: budget latency_ms must be in (0,"),
    ("battery.csv", "t_s,latency_ms,memory_mb,battery\n0,1,2,1.5\n", "battery.csv:2: budget battery must be in"),
    ("syntax.json", '[{"t_s": 0,\n "latency_ms": }]', "syntax.json:2: invalid JSON"),
    ("object.json", '{"t_s": 0}', "expected a non-empty JSON list"),
    ("entry.json", "[[0, 1, 2]]", "entry 0: expected an object"),
    ("missing.json", '[{"t_s": 0, "latency_ms": 1}]', "entry 0: expected keys t_s,latency_ms,memory_mb[,battery]; "
                                                      "missing ['memory_mb'], unknown []"),
    ("unknown.json", '[{"t_s": 0, "latency_ms": 1, "memory_mb": 2, "cpu": 3}]', "unknown ['cpu']"),
    ("type.json", '[{"t_s": 0, "latency_ms": true, "memory_mb": 2}]', "entry 0: latency_ms must be a number"),
    ("order.json", '[{"t_s": 3, "latency_ms": 1, "memory_mb": 2}, {"t_s": 1, "latency_ms": 1, "memory_mb": 2}]',
     "entry 1: t_s 1 is not after the previous point's 3"),
])
def test_malformed_traces_say_where_and_what(tmp_path: Path, name: str, text: str, expected: str) -> None:
    with pytest.raises(BudgetTraceError) as caught:
        TraceBudget.from_file(_write(tmp_path, name, text))
    assert expected in str(caught.value)
    assert name in str(caught.value)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(BudgetTraceError, match="budget trace .*nope.csv does not exist"):
        TraceBudget.from_file(tmp_path / "nope.csv")


def test_points_given_directly_must_increase() -> None:
    with pytest.raises(BudgetTraceError, match="at least one point"):
        TraceBudget([])
    with pytest.raises(BudgetTraceError, match="trace point 1: t_s 0 is not after"):
        TraceBudget([TracePoint(0, Budget(1, 1)), TracePoint(0, Budget(2, 2))])


def test_machine_budget_is_sane_on_this_machine() -> None:
    profile = get_profile("pi4")
    budget = MachineBudget(profile).current()
    assert profile.budget_latency_ms.low <= budget.latency_ms <= profile.budget_latency_ms.high
    assert 1.0 <= budget.memory_mb <= profile.budget_memory_mb.high
    assert budget.battery is None or 0.0 <= budget.battery <= 1.0


def test_machine_budget_formula() -> None:
    profile = get_profile("phone")  # latency [30, 300] ms, memory [128, 1024] MB
    readings = SimpleNamespace(load=0.0, free=8 << 30, battery=None)
    budget = MachineBudget(profile, cpu_load=lambda: readings.load, available_bytes=lambda: readings.free,
                           battery=lambda: readings.battery)
    assert budget.current() == Budget(300, 1024, None)  # idle, plenty free: the loose end
    readings.load, readings.free = 1.0, 100 << 20
    assert budget.current() == Budget(30, 100, None)  # saturated: the tight end; memory as free, below the cap
    readings.load, readings.free = 0.5, 0
    assert budget.current() == Budget(165, 1.0, None)  # never a zero budget the coordinator would refuse
    readings.battery = SimpleNamespace(percent=42.0, power_plugged=False)
    assert budget.current().battery == pytest.approx(0.42)
    readings.battery = SimpleNamespace(percent=42.0, power_plugged=True)
    assert budget.current().battery is None  # plugged in counts as mains power
