"""Density policy (tables of cases) and device profiles."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from contracts.policy import (
    MAX_CALIBRATION_POINTS,
    Budget,
    CalibrationPoint,
    choose_density,
    training_density,
    validate_calibration,
)
from contracts.profiles import UnknownProfileError, get_profile, load_profiles

# 1.0: 100 ms / 800 MB, 0.5: 50 / 400, 0.25: 25 / 200, 0.1: 10 / 80
TABLE = validate_calibration(CalibrationPoint(d, 100 * d, 800 * d) for d in (0.1, 0.25, 1.0, 0.5))


@pytest.mark.parametrize(
    ("latency_ms", "memory_mb", "current", "expected"),
    [
        # no current density: the densest that fits, no margin needed
        (1000, 8000, None, 1.0),
        (100, 800, None, 1.0),  # exactly at the boundary fits
        (99.9, 800, None, 0.5),
        (100, 799, None, 0.5),  # memory binds too
        (30, 10_000, None, 0.25),
        (10, 80, None, 0.1),
        (5, 10_000, None, 0.1),  # nothing fits: the sparsest
        (5, 5, None, 0.1),
        # stepping down happens as soon as the current density no longer fits
        (99, 8000, 1.0, 0.5),
        (49, 8000, 1.0, 0.25),  # straight past 0.5 to the densest that fits
        (9, 8000, 0.5, 0.1),  # nothing fits: the sparsest
        # stepping up needs the 10% margin: 1.0 needs 110 ms / 880 MB (a hair more: floating point)
        (100, 8000, 0.5, 0.5),
        (109.9, 8000, 0.5, 0.5),
        (110.001, 8000, 0.5, 1.0),
        (110.001, 879, 0.5, 0.5),
        (110.001, 880.001, 0.5, 1.0),
        (54, 440, 0.25, 0.25),  # 0.5 needs 55 ms / 440 MB
        (55.001, 440.001, 0.25, 0.5),
        (110.001, 880.001, 0.1, 1.0),  # jumps several steps when the margin allows
        (60, 10_000, 0.1, 0.5),  # ...or to the densest that fits with margin
        # staying put
        (50, 400, 0.5, 0.5),
        (1000, 8000, 1.0, 1.0),
        # a current density the calibration no longer has is ignored
        (60, 10_000, 0.3, 0.5),
    ],
)
def test_choose_density_table(latency_ms: float, memory_mb: float, current: float | None, expected: float) -> None:
    assert choose_density(TABLE, Budget(latency_ms, memory_mb), current) == expected


@pytest.mark.parametrize(("margin", "expected"), [(0.0, 1.0), (0.05, 1.0), (0.10, 0.5), (0.5, 0.5)])
def test_margin_is_configurable(margin: float, expected: float) -> None:
    assert choose_density(TABLE, Budget(105, 8000), current=0.5, margin=margin) == expected


def test_budget_hovering_at_a_boundary_does_not_flap() -> None:
    density = 0.5
    history = []
    for latency in [101, 99, 104, 98, 108, 100.5, 95, 109]:  # hovers around 1.0's 100 ms
        density = choose_density(TABLE, Budget(latency, 8000), density)
        history.append(density)
    assert history == [0.5] * 8
    # without hysteresis the same budgets flip back and forth
    assert len({choose_density(TABLE, Budget(x, 8000), None) for x in [101, 99]}) == 2


def test_negative_margin_is_rejected() -> None:
    with pytest.raises(ValueError, match="margin"):
        choose_density(TABLE, Budget(100, 800), margin=-0.1)


def test_validate_calibration_sorts_densest_first() -> None:
    assert [p.density for p in TABLE] == [1.0, 0.5, 0.25, 0.1]


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([], "empty"),
        ([CalibrationPoint(0.5, 1, 1), CalibrationPoint(0.5, 2, 2)], "more than once"),
        ([CalibrationPoint(0.1 * (i + 1) / 10, 1, 1) for i in range(MAX_CALIBRATION_POINTS + 1)], "at most"),
    ],
)
def test_malformed_calibration_tables(points: list[CalibrationPoint], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_calibration(points)


@pytest.mark.parametrize(
    ("density", "latency_ms", "memory_mb", "message"),
    [
        (0.0, 1, 1, "density"),
        (-0.5, 1, 1, "density"),
        (1.01, 1, 1, "density"),
        (math.nan, 1, 1, "density"),
        (0.5, -1, 1, "latency_ms"),
        (0.5, math.inf, 1, "latency_ms"),
        (0.5, 1, -1, "memory_mb"),
    ],
)
def test_malformed_calibration_points(density: float, latency_ms: float, memory_mb: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CalibrationPoint(density, latency_ms, memory_mb)


# training a step: 1.0: 400 ms / 1000 MB, 0.5: 200 / 500, 0.25: 100 / 250, 0.1: 40 / 100
TRAINING = validate_calibration(CalibrationPoint(d, 100 * d, 800 * d, 400 * d, 1000 * d) for d in (0.1, 0.25, 0.5, 1.0))


@pytest.mark.parametrize(
    ("serving", "memory_mb", "steps", "seconds", "expected"),
    [
        (1.0, None, None, 60.0, 1.0),  # nothing binds: the assignment
        (0.5, 8000, 10, 60.0, 0.5),  # never above the assignment
        (1.0, 600, None, 60.0, 0.5),  # the step's memory binds
        (1.0, 8000, 100, 30.0, 0.5),  # 100 steps in 30 s: 300 ms a step at most
        (1.0, 8000, 100, 3.0, None),  # not even the sparsest trains in time: out of this round
        (0.25, 99, None, 60.0, None),
    ],
)
def test_training_density_fits_memory_and_the_round(serving: float, memory_mb: float | None, steps: int | None,
                                                    seconds: float, expected: float | None) -> None:
    assert training_density(TRAINING, serving, memory_mb, steps, seconds) == expected


def test_unmeasured_training_cost_fits_anything() -> None:
    assert training_density(TABLE, 1.0, 1.0, 10**6, 1e-6) == 1.0


@pytest.mark.parametrize(("field", "value"), [("train_ms", -1.0), ("train_ms", math.nan), ("train_memory_mb", -2.0)])
def test_malformed_training_costs(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        CalibrationPoint(0.5, 1.0, 1.0, **{field: value})


@pytest.mark.parametrize(
    ("latency_ms", "memory_mb", "battery", "message"),
    [
        (0, 100, None, "latency_ms"),
        (-5, 100, None, "latency_ms"),
        (math.nan, 100, None, "latency_ms"),
        (1e9, 100, None, "latency_ms"),
        (10, 0, None, "memory_mb"),
        (10, math.inf, None, "memory_mb"),
        (10, 100, -0.1, "battery"),
        (10, 100, 1.5, "battery"),
    ],
)
def test_budget_out_of_range(latency_ms: float, memory_mb: float, battery: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(latency_ms, memory_mb, battery)


@pytest.mark.parametrize("battery", [None, 0.0, 0.42, 1.0])
def test_budget_in_range(battery: float | None) -> None:
    assert Budget(0.5, 64, battery).battery == battery


# -- profiles --------------------------------------------------------------------------------------------

EXPECTED_PROFILES = {"pi4", "pi5", "jetson-nano", "jetson-orin-nano", "phone", "laptop-x86"}


def test_all_profiles_load_with_sane_values() -> None:
    profiles = load_profiles()
    assert set(profiles) == EXPECTED_PROFILES
    assert profiles["laptop-x86"].relative_speed == 1.0
    for name, p in profiles.items():
        assert p.name == name and p.description
        assert p.cores >= 1 and p.memory_mb >= 512 and 0 < p.relative_speed <= 2
        assert p.budget_memory_mb.high <= p.memory_mb, name
        assert p.budget_latency_ms.low < p.budget_latency_ms.high
    assert profiles["phone"].battery and not profiles["pi4"].battery
    assert profiles["pi4"].relative_speed < profiles["pi5"].relative_speed < profiles["laptop-x86"].relative_speed


def test_get_profile_unknown_lists_valid_names() -> None:
    assert get_profile("jetson-nano").cores == 4
    with pytest.raises(UnknownProfileError) as caught:
        get_profile("pi3")
    assert "'pi3'" in str(caught.value)
    for name in EXPECTED_PROFILES:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[x]\ncores = 1\n', "missing keys"),
        ('[x]\ndescription="d"\ncores=1\nmemory_mb=1\nrelative_speed=1.0\nbudget_latency_ms=[1.0, 2.0]\n'
         'budget_memory_mb=[1.0, 2.0]\nbattery=false\ncolour="red"\n', "unknown keys"),
        ('[x]\ndescription="d"\ncores=1\nmemory_mb=1\nrelative_speed=1.0\nbudget_latency_ms=[5.0, 2.0]\n'
         'budget_memory_mb=[1.0, 2.0]\nbattery=false\n', "low <= high"),
        ('[x]\ndescription="d"\ncores=0\nmemory_mb=1\nrelative_speed=1.0\nbudget_latency_ms=[1.0, 2.0]\n'
         'budget_memory_mb=[1.0, 2.0]\nbattery=false\n', "positive"),
    ],
)
def test_bad_profiles_file_fails_loudly(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_profiles(path)
