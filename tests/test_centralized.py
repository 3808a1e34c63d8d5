"""The centralized reference a simulation report sets its tiers against: made from the accuracy benchmark's DRESS
rows, shipped with the package, and what each tier buys in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.centralized import CENTRALIZED, centralized_reference, reference_of, write_reference
from simulations.report import tier_rows

ACCURACY = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "accuracy.json"


def rows(task: str, seed: int, method: str, accuracy: dict[float, float]) -> list[dict]:
    return [{"task": task, "seed": seed, "method": method, "density": d, "params": 1, "accuracy": a}
            for d, a in accuracy.items()]


def test_the_reference_is_centralized_dress_averaged_over_its_seeds(tmp_path: Path) -> None:
    measured = (rows("fashion-mnist-cnn-w3", 0, "dress", {1.0: 89.5, 0.1: 87.0})
                + rows("fashion-mnist-cnn-w3", 1, "dress", {1.0: 89.7, 0.1: 87.4})
                + rows("fashion-mnist-cnn-w3", 0, "pruned", {1.0: 99.0, 0.1: 99.0}))  # not DRESS: not the reference
    path = tmp_path / "centralized.json"
    write_reference(measured, "python -m benchmarks.accuracy", path)
    assert centralized_reference("fashion-mnist-cnn-w3", path) == {1.0: pytest.approx(89.6), 0.1: pytest.approx(87.2)}
    assert json.loads(path.read_text())["tasks"]["fashion-mnist-cnn-w3"]["seeds"] == [0, 1]
    assert centralized_reference("mnist-cnn", path) == {}  # never trained centrally
    assert centralized_reference("fashion-mnist-cnn-w3", tmp_path / "missing.json") == {}


@pytest.mark.skipif(not ACCURACY.is_file() or "tasks" not in json.loads(ACCURACY.read_text()),
                    reason="benchmarks/results/accuracy.json predates tasks and seeds")
def test_the_shipped_reference_is_the_committed_accuracy_benchmark() -> None:
    committed = json.loads(ACCURACY.read_text())
    assert json.loads(CENTRALIZED.read_text())["tasks"] == reference_of(committed["rows"], "")["tasks"]


def test_a_report_says_what_each_tier_buys_and_how_far_it_is_from_centralized() -> None:
    tiers = tier_rows({"1.0": 88.0, "0.5": 87.5, "0.1": 85.0}, {1.0: 89.5, 0.1: 87.0}, {1.0: 12, 0.1: 70})
    assert [t["density"] for t in tiers] == [1.0, 0.5, 0.1]
    assert [t["over_sparser"] for t in tiers] == [pytest.approx(0.5), pytest.approx(2.5), None]
    assert [t["gap"] for t in tiers] == [pytest.approx(-1.5), None, pytest.approx(-2.0)]  # no reference at 0.5
    assert [t["devices"] for t in tiers] == [12, 0, 70]
