"""The federated benchmark's report, re-derived from its JSON's rows: every table cell, the t intervals, the pairing
by seed, the convergence test. No simulation runs here (the --profile quick run is another test's)."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
from benchmarks.federated_report import centralized_lines, rounds_text, seeds_lines, target_lines  # noqa: E402
from benchmarks.federated_stats import (  # noqa: E402
    ARMS,
    REFERENCE,
    best_configs,
    config_label,
    flat,
    mean_ci,
    paired_difference,
    run_drift,
    signed_drift,
    tables,
)

RESULTS = BENCHMARKS / "results" / "federated.json"
TIERS = (1.0, 0.5, 0.25, 0.1)


def test_mean_ci_is_students_t_at_95_percent() -> None:
    assert mean_ci([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.303 / math.sqrt(3)))  # sd 1, df 2
    assert mean_ci([0.0, 2.0]) == pytest.approx((1.0, 12.706))  # sd √2, n 2: t(1) itself
    five = [81.0, 82.0, 83.0, 84.0, 85.0]
    assert mean_ci(five) == pytest.approx((83.0, 2.776 * statistics.stdev(five) / math.sqrt(5)))
    thirty_one = [float(i % 7) for i in range(31)]
    assert mean_ci(thirty_one)[1] == pytest.approx(2.042 * statistics.stdev(thirty_one) / math.sqrt(31))
    many = [float(i % 5) for i in range(100)]  # past the table: the normal's 1.96
    assert mean_ci(many)[1] == pytest.approx(1.960 * statistics.stdev(many) / 10)
    mean, half = mean_ci([84.5])
    assert mean == 84.5 and math.isnan(half)  # one seed: no interval
    with pytest.raises(ValueError):
        mean_ci([])


def row(method: str, seed: int, accuracy: float, tier: float = 1.0, arm: str = "equal-compute",
        partition: str = "iid", worst10: float | None = None) -> dict[str, Any]:
    return {"task": "fashion-mnist-cnn", "method": method, "arm": arm, "partition": partition, "seed": seed,
            "tier": tier, "accuracy": accuracy, "worst10": worst10}


def test_paired_difference_pairs_by_seed_and_only_the_seeds_both_ran() -> None:
    rows = [row("dress", 0, 80.0), row("dress", 1, 82.0), row("dress", 2, 85.0),
            row("heterofl", 1, 81.0), row("heterofl", 2, 83.0), row("heterofl", 3, 99.0),
            row("heterofl", 2, 10.0, arm="equal-rounds"), row("heterofl", 2, 10.0, partition="labels:2"),
            row("heterofl", 2, 10.0, tier=0.5)]
    mean, half, n = paired_difference(rows, "dress", "heterofl", "equal-compute", "iid", 1.0)
    assert (mean, n) == (1.5, 2)  # seeds 1 and 2: +1, +2
    assert half == pytest.approx(12.706 * statistics.stdev([1.0, 2.0]) / math.sqrt(2))
    empty = paired_difference(rows, "dress", "fjord-kd", "equal-compute", "iid", 1.0)
    assert math.isnan(empty[0]) and empty[2] == 0


def test_a_run_is_flat_when_its_last_fifth_moved_under_a_fifth_of_a_point() -> None:
    assert flat([[80.0] * 10])
    assert not flat([[70.0 + i for i in range(10)]])  # still climbing a point a round
    assert flat([[80.0 + (0.05 if i % 2 else -0.05) for i in range(20)]])  # noise around a plateau
    assert flat([[80.0] * 9 + [80.3], [80.0] * 10])  # drifts averaged over tiers: 0.15
    assert not flat([[80.0] * 9 + [80.5], [80.0] * 10])  # 0.25
    assert flat([[10.0 + i for i in range(30)] + [90.0] * 10])  # the last 20 % is all that counts
    assert not flat([[80.0]])  # one round: nothing to judge
    assert not flat([])


def test_a_runs_signed_drift_says_whether_it_still_learns_or_oscillates() -> None:
    assert signed_drift([70.0 + i for i in range(10)]) == pytest.approx(1.0)  # climbing a point a round
    assert signed_drift([80.0] * 9 + [79.5]) == pytest.approx(-0.5)  # a dip in the last round
    climbing = [{"round": r, "1": 70.0 + r, "0.1": 60.0 + 2 * r} for r in range(10)]
    assert run_drift(climbing) == pytest.approx(1.5)  # averaged over the tiers, "round" not one of them


def synthetic_result() -> dict[str, Any]:
    """Rows, runs and tuning runs as the benchmark writes them: two arms with their own seeds, a method that
    serves only d=1, one that serves every tier with one model, and one seed a peer lacks."""
    rng = random.Random(24)
    methods = {"dress": TIERS, "heterofl": TIERS, "fedavg-small": TIERS, "fedavg-capable": (1.0,)}
    seeds = {"equal-compute": [0, 1, 2, 3, 4], "equal-rounds": [0, 1, 2]}
    runs = []
    for arm in ARMS:
        for partition in ("iid", "labels:2"):
            for seed in seeds[arm]:
                for method, tiers in methods.items():
                    if method == "heterofl" and seed == 4:
                        continue  # paired differences must pair only the seeds both ran
                    one = round(rng.uniform(75, 90), 2)
                    final = {f"{t:g}": one if method == "fedavg-small" else round(rng.uniform(75, 90), 2) for t in tiers}
                    curves = [{"round": r, **{k: a - 10 / r for k, a in final.items()}} for r in range(1, 11)]
                    # runs recorded before devices' accuracy was (the equal-rounds arm here) carry no worst10
                    worst = {k: round(a - rng.uniform(5, 20), 2) for k, a in final.items()} if arm == ARMS[0] else {}
                    runs.append({"task": "fashion-mnist-cnn", "method": method, "arm": arm, "partition": partition,
                                 "seed": seed, "rounds": 10, "curves": curves, "final_accuracy": final,
                                 "device_compute_s": rng.uniform(1, 5), "macs_per_round": rng.uniform(1e9, 5e10),
                                 "bytes_per_round": rng.uniform(1e6, 1e7), "flat": rng.random() < 0.7,
                                 "config": {"lr": 0.05, "server_average": 0.7}, "wall_s": 100.0, "worst10": worst})
    rows = [row(r["method"], r["seed"], a, float(t), r["arm"], r["partition"], r["worst10"].get(t))
            for r in runs for t, a in r["final_accuracy"].items()]
    configs = [{"lr": lr, "server_average": average} for lr in (0.02, 0.05, 0.1) for average in (0.0, 0.7)]
    tuning = [{"method": m, "partition": p, "seed": 100, "config": c, "score": round(rng.uniform(70, 90), 2)}
              for m in methods for c in configs for p in ("iid", "dirichlet:0.3")]
    return {"rows": rows, "runs": runs, "tuning": {"runs": tuning, "best": best_configs(tuning)}}


def expected_cells(result: dict[str, Any]) -> dict[tuple[Any, ...], Any]:
    """Every cell, recomputed from the rows and runs by grouping them afresh (mean_ci is checked above)."""
    cells: dict[tuple[Any, ...], Any] = {}
    groups: dict[tuple[Any, ...], dict[int, float]] = {}
    worst_groups: dict[tuple[Any, ...], dict[int, float]] = {}
    for r in result["rows"]:
        groups.setdefault((r["arm"], r["partition"], r["method"], r["tier"]), {})[r["seed"]] = r["accuracy"]
        if r.get("worst10") is not None:
            worst_groups.setdefault((r["arm"], r["partition"], r["method"], r["tier"]), {})[r["seed"]] = r["worst10"]
    for (arm, partition, method, tier), by_seed in worst_groups.items():
        dress = worst_groups.get((arm, partition, REFERENCE, tier), {})
        if method != REFERENCE and dress.keys() & by_seed.keys():
            cells[arm, partition, "worst10 difference", method, tier] = mean_ci(
                [dress[s] - by_seed[s] for s in sorted(dress.keys() & by_seed.keys())])
    for arm, partition in {(r["arm"], r["partition"]) for r in result["rows"] if r["method"] == REFERENCE}:
        ours = {tier: by_seed for (a, p, m, tier), by_seed in groups.items()
                if (a, p, m) == (arm, partition, REFERENCE)}
        top, bottom = ours[max(ours)], ours[min(ours)]
        cells[arm, partition, "spread"] = mean_ci([top[s] - bottom[s] for s in sorted(top.keys() & bottom.keys())])
    for (arm, partition, method, tier), by_seed in worst_groups.items():
        cells[arm, partition, "worst10", method, tier] = mean_ci(by_seed.values())
    for (arm, partition, method, tier), by_seed in groups.items():
        cells[arm, partition, "accuracy", method, tier] = mean_ci(by_seed.values())
        seeds = sorted({r["seed"] for r in result["rows"]
                        if (r["arm"], r["partition"], r["method"]) == (arm, partition, method)})
        cells[arm, partition, "seeds", method] = seeds
        dress = groups.get((arm, partition, REFERENCE, tier), {})
        if method != REFERENCE and dress.keys() & by_seed.keys():
            differences = [dress[s] - by_seed[s] for s in sorted(dress.keys() & by_seed.keys())]
            cells[arm, partition, "difference", method, tier] = mean_ci(differences)
    for key in {(r["arm"], r["partition"], r["method"]) for r in result["runs"]}:
        ran = [r for r in result["runs"] if (r["arm"], r["partition"], r["method"]) == key]
        cells[(*key[:2], "compute", key[2])] = (
            statistics.fmean(r["device_compute_s"] for r in ran), statistics.fmean(r["macs_per_round"] for r in ran) / 1e9,
            statistics.fmean(r["bytes_per_round"] for r in ran) / 1e6, sum(r["flat"] for r in ran), len(ran))
    scores: dict[tuple[str, str], list[float]] = {}
    for r in result["tuning"]["runs"]:
        scores.setdefault((r["method"], config_label(r["config"])), []).append(r["score"])
    for (method, label), values in scores.items():
        best = max((v for (m, _), v in scores.items() if m == method), key=statistics.fmean)
        cells["tuning", method, label] = (statistics.fmean(values), values is best)
    return cells


def cells_of(t: dict[str, Any]) -> dict[tuple[Any, ...], Any]:
    """tables()'s output in expected_cells' shape."""
    cells: dict[tuple[Any, ...], Any] = {}
    for s in t["sections"]:
        arm, partition = s["arm"], s["partition"]
        for method, by_tier in s["accuracy"].items():
            cells[arm, partition, "seeds", method] = s["seeds"][method]
            for tier, (mean, half, n) in by_tier.items():
                cells[arm, partition, "accuracy", method, tier] = (mean, half)
                assert n == len(s["seeds"][method])
        for peer, by_tier in s["differences"].items():
            for tier, (mean, half, _) in by_tier.items():
                cells[arm, partition, "difference", peer, tier] = (mean, half)
        for method, by_tier in s["worst10"].items():
            for tier, (mean, half, _) in by_tier.items():
                cells[arm, partition, "worst10", method, tier] = (mean, half)
        for peer, by_tier in s["worst10_differences"].items():
            for tier, (mean, half, _) in by_tier.items():
                cells[arm, partition, "worst10 difference", peer, tier] = (mean, half)
        if s["spread"]:
            cells[arm, partition, "spread"] = s["spread"][:2]
        for method, c in s["compute"].items():
            cells[arm, partition, "compute", method] = (c["device_s"], c["gmacs"], c["mb"], c["flat"], c["runs"])
    for method, configs in t["tuning"].items():
        for c in configs:
            cells["tuning", method, config_label(c["config"])] = (c["score"], c["best"])
    return cells


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b)


def test_every_table_cell_is_rederived_from_the_rows() -> None:
    result = synthetic_result()
    ours, theirs = expected_cells(result), cells_of(tables(result))
    assert ours.keys() == theirs.keys()
    wrong = {key: (ours[key], theirs[key]) for key in ours if not same(ours[key], theirs[key])}
    assert not wrong
    section = tables(result)["sections"][0]
    assert (section["arm"], section["partition"]) == ("equal-compute", "iid")  # the headline arm first
    assert list(section["accuracy"]) == ["dress", "heterofl", "fedavg-small", "fedavg-capable"]
    assert list(section["accuracy"]["fedavg-capable"]) == [1.0]  # it serves only the densest tier
    assert list(section["differences"]["fedavg-capable"]) == [1.0]
    assert section["differences"]["heterofl"][1.0][2] == 4  # seed 4 has no heterofl run to pair with


def markdown_tables(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """The tables under each ``## `` heading, as rows of {column: cell}."""
    found: dict[str, list[list[dict[str, str]]]] = {}
    heading, lines = "", text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            block = list(_table_lines(lines[i:]))
            header = block[0]
            found.setdefault(heading, []).append([dict(zip(header, cells)) for cells in block[2:]])
    return found


def _table_lines(lines: list[str]) -> Iterator[list[str]]:
    for line in lines:
        if not line.startswith("|"):
            return
        yield [cell.strip() for cell in line.strip("|").split("|")]


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell)]


def printed(*values: float) -> list[float]:
    """The values as the report rounds them (2 decimals); a nan interval is not printed."""
    return [float(f"{v:.2f}") for v in values if not math.isnan(v)]


def check_markdown(result: dict[str, Any], text: str) -> None:
    """Every number in the report's tables equals its recomputation from the JSON, rounded as printed."""
    cells, found = expected_cells(result), markdown_tables(text)
    sections = {key[:2] for key in cells if key[0] in ARMS}
    assert {h for h in found if " — " in h} == {f"{arm} — {partition}" for arm, partition in sections}
    for arm, partition in sections:
        accuracy, *rest = found[f"{arm} — {partition}"]
        for entry in accuracy:
            method = entry["method"]
            assert [int(s) for s in entry["seeds"].split(",")] == cells[arm, partition, "seeds", method]
            for column, cell in entry.items():
                if column.startswith("d="):
                    key = (arm, partition, "accuracy", method, float(column[2:]))
                    assert numbers(cell) == (printed(*cells[key]) if key in cells else []), (key, cell)
        assert {e["method"] for e in accuracy} == {k[3] for k in cells if k[:3] == (arm, partition, "accuracy")}
        for kind, name in (("worst10", "method"), ("worst10 difference", "peer")):  # tables printed when any cell is
            names = {k[3] for k in cells if k[:3] == (arm, partition, kind)}
            table = rest.pop(0) if names else []
            assert {e[name] for e in table} == names
            for entry in table:
                for column, cell in entry.items():
                    if column.startswith("d="):
                        key = (arm, partition, kind, entry[name], float(column[2:]))
                        assert numbers(cell) == (printed(*cells[key]) if key in cells else []), (key, cell)
                        assert ("▼" in cell) == (key in cells and sum(cells[key]) < 0), (key, cell)
        differences = rest[0] if len(rest) == 2 else []
        for entry in differences:
            for column, cell in entry.items():
                if column.startswith("d="):
                    key = (arm, partition, "difference", entry["peer"], float(column[2:]))
                    assert numbers(cell) == (printed(*cells[key]) if key in cells else []), (key, cell)
                    behind = key in cells and sum(cells[key]) < 0
                    assert ("▼" in cell) == behind, (key, cell)
                    assert (column in entry["DRESS behind at"].split(", ")) == behind, (key, entry)
        assert {e["peer"] for e in differences} == {k[3] for k in cells if k[:3] == (arm, partition, "difference")}
        for entry in rest[-1]:
            device_s, gmacs, mb, flat_runs, runs = cells[arm, partition, "compute", entry["method"]]
            assert numbers(entry["device s/round"]) == printed(device_s)
            assert numbers(entry["GMACs/round"]) == printed(gmacs)
            assert numbers(entry["MB/round"]) == printed(mb)
            assert entry["flat runs"] == f"{flat_runs}/{runs}"
    for entry in (found["Tuning"][0] if result["tuning"]["runs"] else []):
        for label, cell in entry.items():
            if label != "method":
                score, best = cells["tuning", entry["method"], label]
                assert numbers(cell) == printed(score) and cell.startswith("**") == best, (entry["method"], label)


def new_format(path: Path) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("protocol") == "issue-24"


@pytest.mark.skipif(not new_format(RESULTS), reason="benchmarks/results/federated.json predates issue 24's protocol")
def test_the_committed_report_is_its_json_recomputed() -> None:
    result = json.loads(RESULTS.read_text())
    ours, theirs = expected_cells(result), cells_of(tables(result))
    assert ours.keys() == theirs.keys()
    assert all(same(ours[key], theirs[key]) for key in ours)
    assert {r["arm"] for r in result["rows"]} <= set(ARMS)
    assert len(result["rows"]) == sum(len(r["final_accuracy"]) for r in result["runs"])
    check_markdown(result, RESULTS.with_suffix(".md").read_text())


def test_the_report_names_each_cell_that_misses_a_target() -> None:
    """Issue 24: an equal-compute cell whose DRESS − peer interval lies wholly below 0; issue 25: a DRESS tier more
    than 0.3 pt below the next sparser one. Each is named; a result that meets both says none."""
    def runs_for(dress: dict[float, list[float]], peer: dict[float, list[float]]) -> dict[str, Any]:
        rows = [row(m, seed, a, tier) for m, tiers in (("dress", dress), ("heterofl", peer))
                for tier, accs in tiers.items() for seed, a in enumerate(accs)]
        runs = [{"method": m, "arm": "equal-compute", "partition": "iid", "seed": seed, "device_compute_s": 1.0,
                 "macs_per_round": 1e9, "bytes_per_round": 1e6, "flat": True, "rounds": 10, "curves": []}
                for m in ("dress", "heterofl") for seed in range(3)]
        return tables({"rows": rows, "runs": runs, "tuning": {"runs": []}})
    missed = "\n".join(target_lines(runs_for({1.0: [90.0, 90.1, 90.2], 0.5: [88.0, 88.1, 88.3]},
                                             {1.0: [89.0, 89.2, 89.1], 0.5: [89.0, 89.1, 89.2]})["sections"]))
    behind = missed.splitlines()[2]
    assert "iid d=0.5: DRESS − heterofl -0.97 ± " in behind and "d=1" not in behind  # d=1 is ahead: not named
    ordered = "\n".join(target_lines(runs_for({1.0: [88.0, 88.2, 88.1], 0.5: [88.2, 88.3, 88.4]},
                                              {1.0: [87.0, 87.1, 87.2], 0.5: [87.0, 87.1, 87.2]})["sections"]))
    assert ordered.count(": none.") == 3  # 0.2 pt below the next sparser tier is within 0.3
    assert "iid d=1 88.10 < d=0.5 88.30" not in ordered
    unordered = "\n".join(target_lines(runs_for({1.0: [87.0, 87.1, 87.2], 0.5: [88.0, 88.1, 88.2]},
                                                {1.0: [86.0, 86.1, 86.2], 0.5: [86.0, 86.1, 86.2]})["sections"]))
    assert "iid d=1 87.10 < d=0.5 88.10" in unordered


def test_the_report_names_worse_worst_devices_and_a_fleet_short_of_centralized_training() -> None:
    """Issue 25: DRESS's worst 10 % of devices no worse than a peer's (paired interval not wholly below 0); against
    centralized DRESS, at least 70 % of its d=max − d=min gain kept and d=max at most 1.5 pt (IID) or 3 pt
    (Dirichlet 0.3) below it. Each miss is named with its numbers; the table prints the fleet's paired gain."""
    def rows_for(partition: str, dress: dict[float, list[float]], worst: list[float]) -> list[dict[str, Any]]:
        peer_worst = [70.0, 71.0, 72.0]
        return ([row("dress", seed, a, tier, partition=partition, worst10=worst[seed] if tier == 1.0 else None)
                 for tier, accs in dress.items() for seed, a in enumerate(accs)]
                + [row("heterofl", seed, 80.0, tier, partition=partition,
                       worst10=peer_worst[seed] if tier == 1.0 else None) for tier in dress for seed in range(3)])
    rows = (rows_for("iid", {1.0: [88.0, 88.5, 89.0], 0.1: [85.0, 86.0, 86.5]}, [69.0, 69.9, 71.2])  # worse by ~1
            + rows_for("dirichlet:0.3", {1.0: [84.0, 85.0, 86.0], 0.1: [84.0, 84.5, 85.5]}, [71.0, 72.0, 73.0]))
    # Dirichlet: gains 0, 0.5, 0.5 (11 % of 3); d=1 85.00, 4 pt below 89
    runs = [{"method": m, "arm": "equal-compute", "partition": p, "seed": seed, "device_compute_s": 1.0,
             "macs_per_round": 1e9, "bytes_per_round": 1e6, "flat": True, "rounds": 10, "curves": []}
            for m in ("dress", "heterofl") for p in ("iid", "dirichlet:0.3") for seed in range(3)]
    sections = tables({"rows": rows, "runs": runs, "tuning": {"runs": []}})["sections"]
    iid = next(x for x in sections if x["partition"] == "iid")
    assert iid["spread"][:1] == pytest.approx((8 / 3,)) and iid["spread"][2] == 3  # seeds' gains 3, 2.5, 2.5
    reference = {1.0: 89.0, 0.5: 88.0, 0.1: 86.0}  # centralized gain 3 pt
    text = "\n".join(target_lines(sections, reference))
    worse = next(line for line in text.splitlines() if "worst 10 %" in line)
    assert "iid d=1: DRESS − heterofl -0.97 ± " in worse and "dirichlet" not in worse
    central = next(line for line in text.splitlines() if "centralized" in line)
    assert "iid:" not in central  # keeps 89 % and is 0.50 pt below
    assert "dirichlet:0.3: keeps 11 % of the centralized d=1 − d=0.1 gain (at least 70 %)" in central
    assert "dirichlet:0.3: d=1 4.00 pt below centralized (at most 3)" in central
    table = markdown_tables("\n".join(centralized_lines(sections, reference)))["Against centralized training"][0]
    assert [(e["partition"], e["share kept"], e["issue 25"]) for e in table][0] == ("iid", "89 %", "met")
    assert numbers(table[1]["fleet d=max − d=min"]) == printed(*sections[1]["spread"][:2])
    assert centralized_lines(sections, {}) == [] and "centralized" not in "\n".join(target_lines(sections, {}))


def test_the_report_says_whether_every_seed_ran_and_whether_they_are_enough() -> None:
    def result(seeds: list[int], ran: list[int]) -> dict[str, Any]:
        settings = {"methods": ["dress", "heterofl"], "partitions": ["iid"], "seeds": {"equal-compute": seeds}}
        return {"settings": settings,
                "runs": [{"arm": "equal-compute", "method": m, "partition": "iid", "seed": seed}
                         for m in ("dress", "heterofl") for seed in ran]}
    assert seeds_lines(result([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])) == []
    unfinished = seeds_lines(result([0, 1, 2, 3, 4], [0, 1, 2]))[0]
    assert unfinished.startswith("**Not a result yet:**") and "equal-compute 3 of 5" in unfinished
    short = seeds_lines(result([0, 1, 2], [0, 1, 2]))[0]  # a capacity comparison: all its seeds, fewer than 5
    assert "Not a result" not in short and "equal-compute 3 of 5" in short and "every seed" in short
    half = result([0, 1, 2], [0, 1, 2])
    half["runs"] = half["runs"][:-1]  # heterofl lacks seed 2: the cell is unfinished
    assert seeds_lines(half)[0].startswith("**Not a result yet:**")


def test_the_report_says_how_many_rounds_each_kind_of_partition_ran() -> None:
    mixed = {"rounds": 80, "non_iid_rounds": 160, "partitions": ["iid", "labels:2"]}
    assert rounds_text(mixed) == "80 rounds on IID data, 160 on the other partitions"
    assert rounds_text({**mixed, "partitions": ["iid"]}) == "80 rounds"
    assert rounds_text({"rounds": 80, "partitions": ["iid", "labels:2"]}) == "80 rounds"  # a file from before
    assert rounds_text({**mixed, "non_iid_rounds": 80}) == "80 rounds"
    assert rounds_text({**mixed, "partitions": ["labels:2"]}) == "160 rounds"
