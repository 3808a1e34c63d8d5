"""What a resumed federated benchmark accepts: a tuning grid that grew (its new points are tuned, its stale
comparison runs dropped), never one that changed; a longer comparison (its shorter runs redone, tuning kept); an
app setting only DRESS reads changed (DRESS's runs redone, the peers' kept), never one the peers read too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.federated_resume import PROTOCOL, grid_grew, resumed, still_valid, tuned_keys  # noqa: E402

OLD = {"grid": {"lr": [0.03, 0.1], "damped": [False, True]}, "partitions": ["dirichlet:0.3"], "seed": 100}


def test_a_grid_may_grow_but_not_change() -> None:
    assert grid_grew(OLD, {**OLD, "grid": {"lr": [0.03, 0.1, 0.3], "damped": [False, True]}})
    assert grid_grew(OLD, OLD)
    assert not grid_grew(OLD, {**OLD, "grid": {"lr": [0.1, 0.3], "damped": [False, True]}})  # 0.03 dropped
    assert not grid_grew(OLD, {**OLD, "grid": {"lr": [0.03, 0.1], "damped": [False, True], "momentum": [0.9]}})
    assert not grid_grew(OLD, {**OLD, "seed": 101, "grid": {"lr": [0.03, 0.1, 0.3], "damped": [False, True]}})
    assert not grid_grew(None, OLD) and not grid_grew(OLD, None)


APP = {"joint": "all", "distill": 0.5, "server-momentum": 0.0}


def settings(rounds: int, tuning_rounds: int | None, **app: object) -> dict:
    tuning = {**OLD, "arm": "equal-compute", "validation": 10_000}
    return {"task": "fashion-mnist-cnn", "rounds": rounds, "app": {**APP, **app}, "methods": ["dress"],
            "tuning": tuning if tuning_rounds is None else {**tuning, "rounds": tuning_rounds}}


def test_a_longer_comparison_keeps_the_tuning_and_redoes_the_shorter_runs(tmp_path: Path) -> None:
    out = tmp_path / "federated.json"
    runs = [{"method": "dress", "config": {"lr": 0.1}, "rounds": 40, "partition": "iid"},
            {"method": "dress", "config": {"lr": 0.1}, "rounds": 80, "partition": "iid"},
            {"method": "dress", "config": {"lr": 0.3}, "rounds": 80, "partition": "iid"}]
    # a file from before tuning had rounds of its own: its tuning ran the comparison's 40
    out.write_text(json.dumps({"protocol": PROTOCOL, "settings": settings(40, None), "runs": runs,
                               "tuning": {"runs": []}}))
    assert resumed(out, settings(80, 40), resume=True)["runs"] == runs
    with pytest.raises(SystemExit, match="other settings"):  # the tuning's own rounds may not change
        resumed(out, settings(80, 30), resume=True)
    assert still_valid(runs, {"dress": {"lr": 0.1}}, lambda partition: 80) == [runs[1]]
    assert still_valid(runs, {"dress": {"lr": 0.1}}, lambda partition: 40) == [runs[0]]
    non_iid = {**runs[1], "partition": "labels:2"}  # non-IID data has a count of its own
    assert still_valid([runs[1], non_iid], {"dress": {"lr": 0.1}},
                       lambda partition: 80 if partition == "iid" else 160) == [runs[1]]


def test_a_setting_only_dress_reads_redoes_dress_and_keeps_the_peers(tmp_path: Path) -> None:
    out = tmp_path / "federated.json"
    runs = [{"method": m, "config": {"lr": 0.1}, "rounds": 80} for m in ("dress", "heterofl", "fjord-kd")]
    tuning = [{"method": m, "config": {"lr": lr}} for m in ("dress", "heterofl") for lr in (0.1, 0.3)]
    calibration = {"dress": [{"density": 1.0}], "heterofl": [{"density": 1.0}]}
    rows = [{"method": r["method"], "tier": 1.0} for r in runs]
    out.write_text(json.dumps({"protocol": PROTOCOL, "settings": settings(80, 40), "runs": runs, "rows": rows,
                               "tuning": {"runs": tuning, "best": {}}, "calibration": calibration}))
    kept = resumed(out, settings(80, 40, joint="band", distill=0.0), resume=True)
    assert kept["runs"] == runs[1:] and kept["rows"] == rows[1:]  # a report of what is kept reads no DRESS row
    assert kept["tuning"]["runs"] == tuning[2:]
    assert kept["calibration"] == {"heterofl": calibration["heterofl"]}  # DRESS's training step is timed again
    assert resumed(out, settings(80, 40), resume=True)["runs"] == runs  # unchanged: every run kept


def test_a_setting_the_peers_read_still_refuses_the_resume(tmp_path: Path) -> None:
    out = tmp_path / "federated.json"
    out.write_text(json.dumps({"protocol": PROTOCOL, "settings": settings(80, 40), "runs": [],
                               "tuning": {"runs": []}}))
    for changed in ({"server-momentum": 0.9}, {"server-momentum": 0.9, "joint": "band"}):
        with pytest.raises(SystemExit, match="other settings"):
            resumed(out, settings(80, 40, **changed), resume=True)


def test_a_grid_that_gained_a_setting_grew_from_the_value_its_runs_ran_with(tmp_path: Path) -> None:
    """A tuned setting newer than the file (ADDED_GRID): its runs ran with the app's default then, and say so; the
    grid grew by the setting's other values, so those are tuned and the runs kept."""
    out = tmp_path / "federated.json"
    runs = [{"method": "dress", "config": {"lr": 0.1}, "rounds": 80}]
    tuning = [{"method": "dress", "config": {"lr": lr}} for lr in (0.03, 0.1)]
    out.write_text(json.dumps({"protocol": PROTOCOL, "settings": settings(80, 40), "runs": runs,
                               "tuning": {"runs": tuning, "best": {}}}))
    ours = settings(80, 40)
    ours["tuning"] = {**ours["tuning"], "grid": {**OLD["grid"], "logit_adjust": [0.0, 1.0]}}
    kept = resumed(out, ours, resume=True)
    assert kept["runs"] == [{**runs[0], "config": {"lr": 0.1, "logit_adjust": 0.0}}]
    assert [r["config"] for r in kept["tuning"]["runs"]] == [{"lr": 0.03, "logit_adjust": 0.0},
                                                             {"lr": 0.1, "logit_adjust": 0.0}]
    assert resumed(out, settings(80, 40), resume=True)["runs"] == runs  # a grid without it: the file as it is


def test_the_tuned_settings_are_the_grids_or_those_of_the_borrowed_configurations() -> None:
    assert tuned_keys({"tuning": {"grid": {"lr": [0.1], "logit_adjust": [0.0, 1.0]}}}) == {"lr", "logit_adjust"}
    assert tuned_keys({"tuning": None, "configs_from": {"best": {"dress": {"lr": 0.1, "logit_adjust": 1.0}}}}) == \
        {"lr", "logit_adjust"}
    assert tuned_keys({"tuning": None}) == set()
