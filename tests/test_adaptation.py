"""The density-policy replay of benchmarks/device.py: each policy reacts to load as it should."""

from __future__ import annotations

import json

import numpy as np

from agent.latency import LATENCY_WINDOW  # noqa: E402
from benchmarks.adaptation import INTERVAL_MS, TRACE_S, Measured, replay, run  # noqa: E402

DENSITIES = (0.1, 0.25, 0.5, 1.0)
# ms per pass: idle, one and two busy processes; the dense subnet is the one that slows past the deadline
LATENCY = {0: {0.1: 1.0, 0.25: 1.5, 0.5: 2.0, 1.0: 3.0}, 1: {0.1: 1.5, 0.25: 2.0, 0.5: 3.0, 1.0: 6.0},
           2: {0.1: 2.0, 0.25: 3.0, 0.5: 6.0, 1.0: 12.0}}
MEASURED = Measured(
    latency={load: {d: np.full(50, ms) for d, ms in row.items()} for load, row in LATENCY.items()},
    reload_ms={load: {d: 40.0 for d in DENSITIES} for load in LATENCY},
    correct={d: np.arange(100) < 100 * acc for d, acc in zip(DENSITIES, (0.70, 0.80, 0.85, 0.90))},
)


def test_under_steady_load_only_the_policies_that_adapt_meet_the_deadline() -> None:
    steady = lambda now: 1  # noqa: E731
    dense = replay(MEASURED, steady, "static-dense", deadline_ms=4.0, seed=0)
    local = replay(MEASURED, steady, "dress-local", deadline_ms=4.0, seed=0)
    assert dense["miss_rate"] == 100.0 and dense["accuracy"] == 90.0
    assert local["miss_rate"] <= 0.1 and local["accuracy"] >= 84.9  # d=0.5: 3 ms, after at most one late pass
    assert replay(MEASURED, steady, "static-smallest", 4.0, 0) == {"miss_rate": 0.0, "accuracy": 70.0, "p99_ms": 1.5}


def test_a_burst_costs_the_heartbeat_policy_until_its_next_heartbeat_and_the_local_one_a_pass_per_window() -> None:
    """The local policy is late on the burst's first pass; then, as the burst goes on, once per latency window
    at most, when the slowdown it learnt leaves the window and it tries a denser subnet again."""
    burst = lambda now: 2 if 12.0 <= now < 22.0 else 0  # noqa: E731  (heartbeats at 10, 15, 20 s)
    coordinator = replay(MEASURED, burst, "coordinator", deadline_ms=4.0, seed=0)
    local = replay(MEASURED, burst, "dress-local", deadline_ms=4.0, seed=0)
    reload = replay(MEASURED, burst, "reload-pruned", deadline_ms=4.0, seed=0)
    requests, burst_passes = TRACE_S * 1000 / INTERVAL_MS, 10_000 / INTERVAL_MS
    assert local["miss_rate"] <= 100 * (1 + burst_passes / LATENCY_WINDOW) / requests
    assert local["miss_rate"] < coordinator["miss_rate"] / 10  # the burst starts between two heartbeats
    assert reload["miss_rate"] > 0  # requests wait behind the 40 ms load of the pruned model
    assert local["accuracy"] > replay(MEASURED, burst, "static-smallest", 4.0, 0)["accuracy"]


def test_a_kept_measurement_replays_to_the_same_rows() -> None:
    """device.json keeps the samples its rows were replayed from, so a changed policy can be judged on them."""
    rng = np.random.default_rng(0)
    measured = Measured(
        latency={load: {d: rng.gamma(2.0, ms / 2, 40).round(4) for d, ms in row.items()} for load, row in LATENCY.items()},
        reload_ms=MEASURED.reload_ms,
        correct={d: rng.random(1001) < acc for d, acc in zip(DENSITIES, (0.70, 0.80, 0.85, 0.90))},  # not whole bytes
    )
    kept = Measured.from_json(json.loads(json.dumps(measured.to_json())))
    for d in DENSITIES:
        np.testing.assert_array_equal(kept.correct[d], measured.correct[d])
        for load in LATENCY:
            np.testing.assert_array_equal(kept.latency[load][d], measured.latency[load][d])
    assert run(kept, 4.0, seed=1) == run(measured, 4.0, seed=1)
