"""What a resumed federated benchmark accepts: a tuning grid that grew (its new points are tuned, its stale
comparison runs dropped), never one that changed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from federated import grid_grew  # noqa: E402

OLD = {"grid": {"lr": [0.03, 0.1], "damped": [False, True]}, "partitions": ["dirichlet:0.3"], "seed": 100}


def test_a_grid_may_grow_but_not_change() -> None:
    assert grid_grew(OLD, {**OLD, "grid": {"lr": [0.03, 0.1, 0.3], "damped": [False, True]}})
    assert grid_grew(OLD, OLD)
    assert not grid_grew(OLD, {**OLD, "grid": {"lr": [0.1, 0.3], "damped": [False, True]}})  # 0.03 dropped
    assert not grid_grew(OLD, {**OLD, "grid": {"lr": [0.03, 0.1], "damped": [False, True], "momentum": [0.9]}})
    assert not grid_grew(OLD, {**OLD, "seed": 101, "grid": {"lr": [0.03, 0.1, 0.3], "damped": [False, True]}})
    assert not grid_grew(None, OLD) and not grid_grew(OLD, None)
