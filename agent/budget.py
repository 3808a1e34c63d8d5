"""Where a device's budget comes from: the real machine (psutil), or a trace file for reproducible runs.

Both answer `current() -> Budget`, the value the agent heartbeats to the coordinator, which picks the
density from it (contracts.policy.choose_density).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from contracts.policy import Budget
from contracts.profiles import Profile

CSV_COLUMNS = ("t_s", "latency_ms", "memory_mb")
OPTIONAL_COLUMN = "battery"
TRACE_FORMAT = "t_s,latency_ms,memory_mb[,battery]"


class BudgetSource(Protocol):
    """Anything that can say what the device affords right now."""

    def current(self) -> Budget: ...


class MachineBudget:
    """This machine's budget, read from psutil and shaped by the device profile's typical range.

    - latency_ms = loose - (loose - tight) * load, with load the CPU utilisation in [0, 1] averaged since
      the previous reading: an idle device affords the profile's loosest latency, a saturated one its
      tightest, because inference competes with everything that keeps the cores busy.
    - memory_mb = min(available RAM, the profile's loosest memory budget), at least 1 MB: the agent never
      claims more than the profile envisages, and never more than the machine has free right now
      (reporting the profile's floor on a starved host would invite the coordinator to over-commit it).
    - battery = charge fraction from psutil.sensors_battery(); None on machines without one or while
      plugged in (the control plane's convention for mains power).
    """

    def __init__(
        self,
        profile: Profile,
        *,
        cpu_load: Callable[[], float] | None = None,
        available_bytes: Callable[[], int] | None = None,
        battery: Callable[[], Any] | None = None,
    ) -> None:
        self.profile = profile
        self._cpu_load = cpu_load or (lambda: psutil.cpu_percent(interval=None) / 100.0)
        self._available_bytes = available_bytes or (lambda: psutil.virtual_memory().available)
        self._battery = battery or psutil.sensors_battery
        self._cpu_load()  # psutil's first non-blocking reading is meaningless; it starts the window

    def current(self) -> Budget:
        tight, loose = self.profile.budget_latency_ms.low, self.profile.budget_latency_ms.high
        load = min(max(self._cpu_load(), 0.0), 1.0)
        memory_mb = min(self._available_bytes() / 2**20, self.profile.budget_memory_mb.high)
        return Budget(loose - (loose - tight) * load, max(memory_mb, 1.0), self._battery_fraction())

    def _battery_fraction(self) -> float | None:
        battery = self._battery()
        if battery is None or battery.power_plugged:
            return None
        return min(max(battery.percent / 100.0, 0.0), 1.0)


class BudgetTraceError(ValueError):
    """A budget trace file is missing or malformed; the message says where and what was expected."""


@dataclass(frozen=True, slots=True)
class TracePoint:
    t_s: float  # seconds since the trace started
    budget: Budget


class TraceBudget:
    """A budget that follows a recorded trace: point i holds from its t_s until the next point's.

    Time counts from the first `current()` call (the first heartbeat), so a trace replays the same
    whatever the agent's start-up took. Before the first point's time the first point holds; after the
    last point the last one holds.
    """

    def __init__(self, points: Sequence[TracePoint], clock: Callable[[], float] = time.monotonic) -> None:
        if not points:
            raise BudgetTraceError("a budget trace needs at least one point")
        _check_times(points, [f"trace point {i}" for i in range(len(points))])
        self.points = tuple(points)
        self._times = [p.t_s for p in self.points]
        self._clock = clock
        self._start: float | None = None

    def elapsed(self) -> float:
        now = self._clock()
        if self._start is None:
            self._start = now
        return now - self._start

    def current(self) -> Budget:
        index = bisect.bisect_right(self._times, self.elapsed()) - 1
        return self.points[max(index, 0)].budget

    @classmethod
    def from_file(cls, path: str | Path, clock: Callable[[], float] = time.monotonic) -> TraceBudget:
        """Read a CSV (header `t_s,latency_ms,memory_mb[,battery]`) or a JSON list of such objects."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise BudgetTraceError(f"budget trace {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BudgetTraceError(f"cannot read budget trace {path}: {e}") from None
        is_json = path.suffix.lower() == ".json" or (path.suffix.lower() != ".csv" and text.lstrip()[:1] == "[")
        points = _parse_json(text, path) if is_json else _parse_csv(text, path)
        return cls(points, clock)


def _point(where: str, t_s: float, latency_ms: float, memory_mb: float, battery: float | None) -> TracePoint:
    if not (math.isfinite(t_s) and t_s >= 0):
        raise BudgetTraceError(f"{where}: t_s must be a finite number of seconds >= 0, got {t_s!r}")
    try:
        return TracePoint(t_s, Budget(latency_ms, memory_mb, battery))
    except ValueError as e:
        raise BudgetTraceError(f"{where}: {e}") from None


def _check_times(points: Sequence[TracePoint], wheres: Sequence[str]) -> None:
    for i in range(1, len(points)):
        if points[i].t_s <= points[i - 1].t_s:
            raise BudgetTraceError(f"{wheres[i]}: t_s {points[i].t_s:g} is not after the previous point's "
                                   f"{points[i - 1].t_s:g}; times must increase")


def _parse_csv(text: str, path: Path) -> list[TracePoint]:
    rows = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), start=1) if any(c.strip() for c in row)]
    if not rows:
        raise BudgetTraceError(f"{path} is empty; expected a CSV header {TRACE_FORMAT}")
    header_line, header = rows[0]
    columns = tuple(c.strip() for c in header)
    if columns not in (CSV_COLUMNS, (*CSV_COLUMNS, OPTIONAL_COLUMN)):
        raise BudgetTraceError(f"{path}:{header_line}: header must be {TRACE_FORMAT}, got {','.join(columns)!r}")
    points, wheres = [], []
    for line, row in rows[1:]:
        where = f"{path}:{line}"
        if len(row) != len(columns):
            raise BudgetTraceError(f"{where}: expected {len(columns)} values ({','.join(columns)}), got {len(row)}")
        cells = [c.strip() for c in row]
        try:
            t_s, latency_ms, memory_mb = (float(c) for c in cells[:3])
            battery = float(cells[3]) if len(cells) == 4 and cells[3] else None
        except ValueError:
            raise BudgetTraceError(f"{where}: expected numbers ({','.join(columns)}), got {','.join(cells)!r}") from None
        points.append(_point(where, t_s, latency_ms, memory_mb, battery))
        wheres.append(where)
    if not points:
        raise BudgetTraceError(f"{path} has a header but no points")
    _check_times(points, wheres)
    return points


def _number(value: object, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetTraceError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _parse_json(text: str, path: Path) -> list[TracePoint]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BudgetTraceError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list) or not data:
        raise BudgetTraceError(f"{path}: expected a non-empty JSON list of objects with {TRACE_FORMAT}")
    allowed = {*CSV_COLUMNS, OPTIONAL_COLUMN}
    points, wheres = [], []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise BudgetTraceError(f"{where}: expected an object with {TRACE_FORMAT}, got {entry!r}")
        missing, unknown = sorted(set(CSV_COLUMNS) - set(entry)), sorted(set(entry) - allowed)
        if missing or unknown:
            raise BudgetTraceError(f"{where}: expected keys {TRACE_FORMAT}; missing {missing}, unknown {unknown}")
        t_s, latency_ms, memory_mb = (_number(entry[k], where, k) for k in CSV_COLUMNS)
        battery = entry.get(OPTIONAL_COLUMN)
        points.append(_point(where, t_s, latency_ms, memory_mb,
                             None if battery is None else _number(battery, where, OPTIONAL_COLUMN)))
        wheres.append(where)
    _check_times(points, wheres)
    return points
