"""Density policy: which nested subnet a device should run, given what it measured and what it can afford.

Pure functions over small value objects, so the registry, the control plane and the tests share one rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_MARGIN = 0.10
MAX_CALIBRATION_POINTS = 64
MAX_LATENCY_MS = 600_000.0  # ten minutes per inference: anything above is a unit mistake, not a budget
MAX_MEMORY_MB = 1_048_576.0  # 1 TiB


def _finite_in(value: float, name: str, low: float, high: float, *, low_open: bool) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:.10g}, {high:.10g}], got {value!r}")


@dataclass(frozen=True, slots=True)
class Budget:
    """What a device can afford right now, as it reports it; invalid budgets cannot be built."""

    latency_ms: float
    memory_mb: float
    battery: float | None = None  # fraction in [0, 1]; None for mains-powered devices

    def __post_init__(self) -> None:
        _finite_in(self.latency_ms, "budget latency_ms", 0.0, MAX_LATENCY_MS, low_open=True)
        _finite_in(self.memory_mb, "budget memory_mb", 0.0, MAX_MEMORY_MB, low_open=True)
        if self.battery is not None:
            _finite_in(self.battery, "budget battery", 0.0, 1.0, low_open=False)


@dataclass(frozen=True, slots=True)
class CalibrationPoint:
    """Cost of running the subnet at one density, measured on the device itself."""

    density: float
    latency_ms: float
    memory_mb: float
    train_ms: float = 0.0  # one training step at the calibration batch; 0: not measured
    train_memory_mb: float = 0.0  # training state plus activations of that step; 0: not measured

    def __post_init__(self) -> None:
        _finite_in(self.density, "calibration density", 0.0, 1.0, low_open=True)
        where = f"at density {self.density:g}"
        _finite_in(self.latency_ms, f"calibration latency_ms {where}", 0.0, MAX_LATENCY_MS, low_open=False)
        _finite_in(self.memory_mb, f"calibration memory_mb {where}", 0.0, MAX_MEMORY_MB, low_open=False)
        _finite_in(self.train_ms, f"calibration train_ms {where}", 0.0, MAX_LATENCY_MS, low_open=False)
        _finite_in(self.train_memory_mb, f"calibration train_memory_mb {where}", 0.0, MAX_MEMORY_MB, low_open=False)

    def trains_within(self, memory_mb: float, step_seconds: float | None) -> bool:
        """True if training at this density fits ``memory_mb`` and, when given, a step takes at most
        ``step_seconds``; an unmeasured cost fits."""
        if self.train_memory_mb > memory_mb:
            return False
        return step_seconds is None or self.train_ms / 1000 <= step_seconds

    def fits(self, budget: Budget, margin: float = 0.0) -> bool:
        """True if this subnet's cost, inflated by `margin`, stays within the budget."""
        scale = 1.0 + margin
        return self.latency_ms * scale <= budget.latency_ms and self.memory_mb * scale <= budget.memory_mb


def validate_calibration(points: Iterable[CalibrationPoint]) -> tuple[CalibrationPoint, ...]:
    """The calibration sorted densest first; rejects empty, oversized or duplicate-density tables."""
    table = tuple(sorted(points, key=lambda p: p.density, reverse=True))
    if not table:
        raise ValueError("calibration is empty: measure at least one density")
    if len(table) > MAX_CALIBRATION_POINTS:
        raise ValueError(f"calibration has {len(table)} points; at most {MAX_CALIBRATION_POINTS} allowed")
    for denser, sparser in zip(table, table[1:]):
        if denser.density == sparser.density:
            raise ValueError(f"calibration lists density {denser.density:g} more than once")
    return table


def training_density(
    calibration: Sequence[CalibrationPoint], serving: float, memory_mb: float | None, steps: int | None,
    seconds: float,
) -> float | None:
    """The densest calibrated density at or below ``serving`` whose training fits the device: the step's
    memory within ``memory_mb`` (its last reported budget; None: unknown) and ``steps`` steps within
    ``seconds``. None when not even the sparsest fits: the device sits this round out."""
    memory = math.inf if memory_mb is None else memory_mb
    per_step = None if not steps else seconds / steps
    fitting = [p.density for p in calibration if p.density <= serving and p.trains_within(memory, per_step)]
    return max(fitting, default=None)


def choose_density(
    calibration: Sequence[CalibrationPoint],
    budget: Budget,
    current: float | None = None,
    margin: float = DEFAULT_MARGIN,
) -> float:
    """The densest subnet that fits the budget, with hysteresis so a budget at a boundary does not flap.

    Stepping down happens as soon as the current density no longer fits; stepping up needs the denser
    subnet to fit with `margin` to spare. With nothing fitting, the sparsest subnet is the least bad.
    `calibration` must come from validate_calibration (densest first).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    by_density = {p.density: p for p in calibration}
    if current is not None and current in by_density and by_density[current].fits(budget):
        for point in calibration:  # densest first
            if point.density <= current:
                break
            if point.fits(budget, margin):
                return point.density
        return current
    for point in calibration:
        if point.fits(budget):
            return point.density
    return calibration[-1].density
