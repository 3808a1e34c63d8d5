"""The federated ablation's report pairs every variant with its baseline by seed: the one its settings name, or
mean+anchor for files made before a baseline could be chosen."""

from __future__ import annotations

import pytest

from benchmarks.federated_ablation import BASELINE, report


def run(variant: str, seed: int, d1: float, d01: float) -> dict:
    return {"variant": variant, "partition": "iid", "seed": seed, "final_accuracy": {"1": d1, "0.1": d01},
            "device_rounds": {"1": 10, "0.1": 20}, "flat": True, "wall_s": 60.0}


def result(runs: list[dict], **settings: object) -> dict:
    return {"command": "python -m benchmarks.federated_ablation", "runs": runs,
            "settings": {"task": "fashion-mnist-cnn-w3", "base": {}, "variants": ["own", "own-drawn", BASELINE],
                         "partitions": ["iid"], "seeds": [200, 201], "densities": [0.1, 1.0], "devices": 100,
                         "rounds": 40, "fraction": 0.1, "epochs": 2, **settings}}


RUNS = [run("own", 200, 88.0, 84.0), run("own", 201, 86.0, 83.0),
        run("own-drawn", 200, 88.5, 85.0), run("own-drawn", 201, 87.5, 84.0),
        run(BASELINE, 200, 85.0, 84.5), run(BASELINE, 201, 85.0, 84.5)]


def row_of(markdown: str, variant: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {variant} |"))


def test_variants_are_paired_with_the_baseline_their_settings_name() -> None:
    text = report(result(RUNS, baseline="own"))
    assert "paired by seed against own." in text
    assert "Δ" not in row_of(text, "own")
    drawn = row_of(text, "own-drawn")
    assert "Δ +1.00 ± 6.35" in drawn  # d=1: +0.5 and +1.5 over own, paired by seed (t, 1 degree of freedom)
    assert "Δ +1.00 ± 0.00" in drawn  # d=0.1: +1.0 on both seeds
    assert "(Δ" in row_of(text, BASELINE)


def test_a_file_without_a_baseline_pairs_with_mean_and_anchor() -> None:
    text = report(result(RUNS))
    assert f"paired by seed against {BASELINE}." in text
    assert "Δ" not in row_of(text, BASELINE)
    assert "Δ +2.00 ± 12.71" in row_of(text, "own")  # d=1: +3.0 and +1.0 over mean+anchor
    with pytest.raises(StopIteration):
        row_of(text, "sum")  # a variant without runs has no row
