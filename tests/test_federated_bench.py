"""The federated comparison end to end at its smallest: `python -m benchmarks.federated --profile quick`, cut to two
methods on HeteroFL's label split, the equal-compute arm (the one issue 24's targets are about), one seed, two rounds —
real simulations, the protocol unchanged. The arms differ only in the settings their jobs give a run, which the
second test checks without simulating: two more simulations would cost more than a minute of a suite that must stay
under ten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
from test_federated_report import check_markdown  # noqa: E402

from benchmarks import federated  # noqa: E402
from benchmarks.federated_report import tuning_lines  # noqa: E402
from benchmarks.federated_resume import PROTOCOL, resumed  # noqa: E402
from benchmarks.federated_stats import ARMS, tables  # noqa: E402


def test_the_quick_profile_runs_paired_methods_and_reports_what_its_json_holds(tmp_path: Path) -> None:
    out = tmp_path / "federated.json"
    cmd = [sys.executable, "-m", "benchmarks.federated", "--profile", "quick", "--methods", "dress,heterofl",
           "--partitions", "labels:2", "--rounds", "2", "--devices", "6", "--arms", "equal-compute",
           "--seeds-equal-compute", "0", "--out", str(out), "--run-dir", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {(r["method"], r["arm"]) for r in runs} == {("dress", "equal-compute"), ("heterofl", "equal-compute")}
    assert set(result["calibration"]) == {"dress", "heterofl"}  # each method's fleet from its own model
    dress, heterofl = (next(r for r in runs if r["method"] == m) for m in ("dress", "heterofl"))
    assert dress["seed"] == heterofl["seed"] and dress["macs_per_round"] > 0 and heterofl["macs_per_round"] > 0
    rows = result["rows"]
    assert {tuple(sorted(r)) for r in rows} == {("accuracy", "arm", "method", "partition", "seed", "task", "tier",
                                                 "worst10")}
    assert {r["tier"] for r in rows} == {1.0, 0.5, 0.25, 0.1} and all(0 <= r["accuracy"] <= 100 for r in rows)
    for run in runs:  # every device it trained is judged on its own classes, at its tier
        accuracies = list(run["device_accuracy"].values())
        assert accuracies and all(0 <= a <= 100 for a in accuracies)
        assert set(run["worst10"]) <= set(run["final_accuracy"])
        assert run["worst10_fleet"] <= sum(accuracies) / len(accuracies)
    assert all(r["worst10"] is None or 0 <= r["worst10"] <= 100 for r in rows)
    assert tables(result)["sections"]  # the report is built from the rows
    check_markdown(result, (tmp_path / "federated.md").read_text())


def test_the_arms_pair_every_method_and_differ_only_in_compute_matching() -> None:
    """Per seed, every method of an arm runs the same partition and settings; the arms differ in compute matching
    alone (``--compute-matched``: test_cost.py checks that a device then spends its budget whatever the method)."""
    args = federated.parse_args(["--profile", "quick"])
    jobs = federated.comparison_jobs(["dress", "heterofl"], ["labels:2"], {arm: [0] for arm in ARMS})
    assert [(j.phase, j.method) for j in jobs] == [(arm, m) for arm in ("equal-compute", "equal-rounds")
                                                   for m in ("dress", "heterofl")]
    settings = {(j.phase, j.method): j.run_settings(args) for j in jobs}
    for arm in ARMS:
        dress, heterofl = settings[arm, "dress"], settings[arm, "heterofl"]
        assert dress.replace(method="heterofl") == heterofl  # paired: only the method differs
        assert dress.compute_matched == (arm == "equal-compute")
    assert settings["equal-compute", "dress"].replace(compute_matched=False) == settings["equal-rounds", "dress"]


def test_configurations_borrowed_from_another_result_replace_tuning(tmp_path: Path) -> None:
    """``--configs-from``: each method runs the configuration another result's tuning chose, nothing is tuned, the
    JSON says where they came from, and a result made otherwise does not resume under it."""
    other = tmp_path / "tuned.json"
    grid = federated.grid()
    tuned = [{"method": m, "partition": "dirichlet:0.3", "seed": 100, "config": c, "score": score, "wall_s": 1.0}
             for m, best in (("dress", 3), ("heterofl", 5)) for i, c in enumerate(grid)
             for score in [90.0 if i == best else 80.0]]
    other.write_text(json.dumps({"protocol": PROTOCOL, "settings": {"task": "fashion-mnist-cnn"},
                                 "tuning": {"runs": tuned}}))
    args = federated.parse_args(["--profile", "quick", "--methods", "dress,heterofl", "--configs-from", str(other),
                                 "--task", "fashion-mnist-cnn-w3", "--out", str(tmp_path / "out.json")])
    assert args.tune is False
    methods, partitions, seeds = federated.selection(args)
    settings = federated.settings_of(args, methods, partitions, seeds)
    assert settings["configs_from"]["task"] == "fashion-mnist-cnn"
    assert federated.untuned_configs(settings) == {"dress": grid[3], "heterofl": grid[5]}
    said = "\n".join(tuning_lines({"settings": settings, "tuning": {"best": federated.untuned_configs(settings)}}, {}))
    assert f"--configs-from {other}" in said and "fashion-mnist-cnn" in said  # the report says where they came from

    plain = federated.settings_of(federated.parse_args(["--profile", "quick", "--methods", "dress,heterofl"]),
                                  methods, partitions, seeds)
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"protocol": PROTOCOL, "settings": plain, "runs": [], "tuning": {"runs": []}}))
    with pytest.raises(SystemExit, match="configs_from"):  # borrowed configurations never mix with others
        resumed(stored, {**plain, "configs_from": settings["configs_from"]}, resume=True)
    stored.write_text(json.dumps({"protocol": PROTOCOL, "settings": {**plain, "configs_from": settings["configs_from"]},
                                  "runs": [], "tuning": {"runs": []}}))
    with pytest.raises(SystemExit, match="configs_from"):
        resumed(stored, plain, resume=True)

    with pytest.raises(SystemExit, match="no tuning runs of fjord-kd"):
        federated.borrowed_configs(other, ["dress", "fjord-kd"])
    with pytest.raises(SystemExit) as refused:  # it replaces tuning: both at once is a contradiction
        federated.parse_args(["--configs-from", str(other), "--tune"])
    assert refused.value.code == 2
