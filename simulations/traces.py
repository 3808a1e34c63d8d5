"""Budget traces for virtual devices: what share of its own CPU and memory a device can give inference, round by round.

A trace is a list of points indexed by federated ROUND (point r is in force once r rounds have completed), so
which budget a device reports in a round depends on the seed alone, never on how fast this machine runs.
The shares are relative to the device itself: a Pi 4 with all its CPU free is still a Pi 4 (simulations.fleet
turns a point into an absolute budget against the fleet's common deadline).

Families, each drawn from one seeded RNG per device:
  steady   the device is mostly idle: 90-100% of the CPU available, small noise;
  diurnal  a sinusoidal day of user activity over DIURNAL_PERIOD rounds takes 0-70% of the CPU (random phase);
  bursty   a foreground app comes and goes (two-state Markov chain): while it runs, 20-50% of the CPU and less
           memory are left;
  battery  the battery drains each round from a random start; below LOW_BATTERY the OS power saving scales
           compute down (devices without a battery run steady instead);
  mixed    each device draws one of the above (battery only where the profile has one);
  constant every device at its whole budget in every round: tiers never change, so runs of different methods
           on the same seed train the same devices at the same tiers (paired comparisons, benchmarks/federated.py).
Dropout adds an offline window of a few rounds to a share of the devices. A CSV file gives traces by hand.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contracts.profiles import Profile

MIXED = "mixed"
CSV_COLUMNS = ("trace", "round", "available", "memory_share", "battery", "online")
DIURNAL_PERIOD = 24  # rounds per simulated day
LOW_BATTERY = 0.3  # below this charge the OS saves power
BURST_START, BURST_STOP = 0.2, 0.4  # per-round chances that a foreground app starts / stops


@dataclass(frozen=True)
class TracePoint:
    available: float  # share of the device's CPU free for inference, in (0, 1]
    memory_share: float  # share of the device's memory free for inference, in (0, 1]
    battery: float | None  # charge in [0, 1]; None where the trace says nothing about a battery
    online: bool


# -- generated families: (rng, rounds) -> one point per round 0..rounds, all online ----------------------------


def _constant(rng: random.Random, rounds: int) -> list[TracePoint]:
    return [TracePoint(1.0, 1.0, None, True) for _ in range(rounds + 1)]


def _steady(rng: random.Random, rounds: int) -> list[TracePoint]:
    return [TracePoint(rng.uniform(0.9, 1.0), rng.uniform(0.8, 1.0), None, True) for _ in range(rounds + 1)]


def _diurnal(rng: random.Random, rounds: int) -> list[TracePoint]:
    phase = rng.uniform(0, 2 * math.pi)
    points = []
    for r in range(rounds + 1):
        activity = 0.35 * (1 + math.sin(2 * math.pi * r / DIURNAL_PERIOD + phase))  # 0..0.7 of the CPU
        points.append(TracePoint(1.0 - activity, 1.0 - activity / 2, None, True))
    return points


def _bursty(rng: random.Random, rounds: int) -> list[TracePoint]:
    busy = rng.random() < BURST_START / (BURST_START + BURST_STOP)  # start in the chain's stationary distribution
    points = []
    for _ in range(rounds + 1):
        if busy:
            points.append(TracePoint(rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.6), None, True))
        else:
            points.append(TracePoint(rng.uniform(0.9, 1.0), rng.uniform(0.8, 1.0), None, True))
        busy = rng.random() >= BURST_STOP if busy else rng.random() < BURST_START
    return points


def _battery(rng: random.Random, rounds: int) -> list[TracePoint]:
    charge, drain = rng.uniform(0.4, 1.0), rng.uniform(0.01, 0.05)  # drain: charge lost per round
    points = []
    for r in range(rounds + 1):
        level = max(0.0, charge - drain * r)
        saving = 0.25 + 0.75 * level / LOW_BATTERY if level < LOW_BATTERY else 1.0  # 1 at LOW_BATTERY, 0.25 empty
        points.append(TracePoint(rng.uniform(0.9, 1.0) * saving, rng.uniform(0.8, 1.0), level, True))
    return points


_GENERATORS: dict[str, Callable[[random.Random, int], list[TracePoint]]] = {
    "steady": _steady, "diurnal": _diurnal, "bursty": _bursty, "battery": _battery, "constant": _constant,
}
FAMILIES = tuple(_GENERATORS)
MIXED_FAMILIES = ("steady", "diurnal", "bursty", "battery")  # what ``mixed`` draws from
TRACES_HELP = f"{', '.join((*FAMILIES, MIXED))} or a PATH.csv"


def is_family(spec: str) -> bool:
    return spec in _GENERATORS or spec == MIXED


def make_trace(family: str, profile: Profile, rounds: int, seed: int, dropout: float) -> list[TracePoint]:
    """One device's trace for rounds 0..``rounds`` of a family (or ``mixed``), with a chance of an offline window."""
    if not is_family(family):
        raise ValueError(f"unknown trace family {family!r}; expected {TRACES_HELP}")
    rng = random.Random(seed)
    if family == MIXED:
        family = rng.choice([f for f in MIXED_FAMILIES if f != "battery" or profile.battery])
    if family == "battery" and not profile.battery:
        family = "steady"
    points = _GENERATORS[family](rng, rounds)
    if rng.random() < dropout:
        length = rng.randint(2, 4)
        start = rng.randint(1, max(1, rounds + 1 - length))  # online for round 1, offline within the run
        points = [TracePoint(p.available, p.memory_share, p.battery, not start <= r < start + length)
                  for r, p in enumerate(points)]
    return points


def at(trace: list[TracePoint], completed_rounds: int) -> TracePoint:
    """The point in force once ``completed_rounds`` rounds are done; past the end, the last point holds."""
    return trace[min(max(completed_rounds, 0), len(trace) - 1)]


# -- traces from a file ---------------------------------------------------------------------------------------


def check_traces(spec: str) -> None:
    """ValueError now for a --traces value that is neither a family nor a valid CSV, before a process starts."""
    if not is_family(spec):
        read_trace_csv(_csv_path(spec))


def fleet_traces(spec: str, profiles: list[Profile], rounds: int, seed: int, dropout: float) -> list[list[TracePoint]]:
    """One trace per device: generated from a family (``dropout`` applies), or the file's traces in turn."""
    if is_family(spec):
        return [make_trace(spec, profile, rounds, seed * 7919 + i, dropout) for i, profile in enumerate(profiles)]
    traces = read_trace_csv(_csv_path(spec))
    ids = sorted(traces)
    return [traces[ids[i % len(ids)]] for i in range(len(profiles))]


def _csv_path(spec: str) -> Path:
    path = Path(spec)
    if path.suffix.lower() != ".csv" and not path.is_file():
        raise ValueError(f"unknown trace family {spec!r}; expected {TRACES_HELP}")
    return path


def read_trace_csv(path: Path) -> dict[str, list[TracePoint]]:
    """Traces by id from a CSV with header ``trace,round,available,memory_share,battery,online``.

    Rows of one trace may come in any order; a round a trace skips holds the previous row's point. ValueError
    naming the file and line for anything malformed.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read trace file {path}: {e}") from None
    lines = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), start=1) if any(c.strip() for c in row)]
    if not lines:
        raise ValueError(f"{path} is empty; expected a CSV header {','.join(CSV_COLUMNS)}")
    header_line, header = lines[0]
    columns = [c.strip() for c in header]
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path}:{header_line}: header lacks column(s) {', '.join(missing)}; "
                         f"expected {','.join(CSV_COLUMNS)}")
    rows: dict[str, dict[int, TracePoint]] = {}
    for line, row in lines[1:]:
        where = f"{path}:{line}"
        if len(row) != len(columns):
            raise ValueError(f"{where}: expected {len(columns)} values ({','.join(columns)}), got {len(row)}")
        cells = dict(zip(columns, (c.strip() for c in row)))
        trace, round_number, point = cells["trace"], _round(cells["round"], where), _csv_point(cells, where)
        if not trace:
            raise ValueError(f"{where}: trace id is empty")
        if round_number in rows.setdefault(trace, {}):
            raise ValueError(f"{where}: trace {trace!r} lists round {round_number} twice")
        rows[trace][round_number] = point
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return {trace: _hold(points) for trace, points in rows.items()}


def _round(cell: str, where: str) -> int:
    try:
        value = int(cell)
    except ValueError:
        raise ValueError(f"{where}: round must be a whole number >= 0, got {cell!r}") from None
    if value < 0:
        raise ValueError(f"{where}: round must be a whole number >= 0, got {value}")
    return value


def _share(cells: dict[str, str], key: str, where: str, low_open: bool) -> float:
    try:
        value = float(cells[key])
    except ValueError:
        raise ValueError(f"{where}: {key} must be a number, got {cells[key]!r}") from None
    low = "(0" if low_open else "[0"
    if not (math.isfinite(value) and (0 < value if low_open else 0 <= value) and value <= 1):
        raise ValueError(f"{where}: {key} must be in {low}, 1], got {cells[key]!r}")
    return value


def _csv_point(cells: dict[str, str], where: str) -> TracePoint:
    online = cells["online"].lower()
    if online not in ("0", "1", "true", "false"):
        raise ValueError(f"{where}: online must be 0, 1, true or false, got {cells['online']!r}")
    return TracePoint(
        available=_share(cells, "available", where, low_open=True),
        memory_share=_share(cells, "memory_share", where, low_open=True),
        battery=_share(cells, "battery", where, low_open=False) if cells["battery"] else None,
        online=online in ("1", "true"),
    )


def _hold(points: dict[int, TracePoint]) -> list[TracePoint]:
    """Rounds 0..last as a list: before the first row the first point, in a gap the previous one."""
    first = points[min(points)]
    dense, current = [], first
    for r in range(max(points) + 1):
        current = points.get(r, current)
        dense.append(current)
    return dense
