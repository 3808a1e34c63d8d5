"""The federated benchmark's statistics, from its JSON alone: confidence intervals, paired differences, convergence.

Pure Python (no scipy, no torch), so the report can be rebuilt and its every cell checked from the results file
(tests/test_federated_report.py) without the simulation stack.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ARMS = ("equal-compute", "equal-rounds")  # the report's order: the headline arm first
MIN_SEEDS = {"equal-compute": 5, "equal-rounds": 3}  # issue 24: fewer is a smoke run, not a result
REFERENCE = "dress"  # the method every peer is paired against
FLAT_PT = 0.2  # a run is flat when its accuracy moved less than this over the last 20 % of its rounds
FLAT_WINDOW = 0.1  # share of the rounds in each of the two windows compared

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal's.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.960

Cell = tuple[float, float, int]  # mean, 95 % half-width (nan with one value), how many values


def t_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return T_975[df - 1] if df <= len(T_975) else Z_975


def mean_ci(values: Iterable[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % confidence interval (t-distribution); the half-width is nan for one value:
    one seed says nothing about the spread."""
    xs = list(values)
    if not xs:
        raise ValueError("mean_ci of no values")
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return mean, math.nan
    return mean, t_975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def ci_text(mean: float, half: float, sign: str = "") -> str:
    """``mean ± half`` as the reports print it (``sign`` "+": always signed); one value has no interval."""
    return f"{mean:{sign}.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")


def paired_difference(rows: Sequence[Mapping[str, Any]], method: str, peer: str, arm: str, partition: str,
                      tier: float, field: str = "accuracy", peer_tier: float | None = None) -> Cell:
    """``method`` − ``peer`` at one tier, paired by seed (the seeds both ran): the same devices, shards and rounds,
    so the pair's difference carries neither the seed's luck nor its data split. ``field``: the rows' value
    compared ("worst10": the worst 10 % of devices; rows without it are left out); ``peer_tier``: the peer's tier
    when it is another (a method against itself: what its denser tier gains over a sparser one, seed by seed).
    (nan, nan, 0) without pairs."""
    def by_seed(name: str, at: float) -> dict[int, float]:
        return {r["seed"]: r[field] for r in rows if r["method"] == name and r["arm"] == arm
                and r["partition"] == partition and math.isclose(r["tier"], at) and r.get(field) is not None}

    ours, theirs = by_seed(method, tier), by_seed(peer, tier if peer_tier is None else peer_tier)
    differences = [ours[s] - theirs[s] for s in sorted(ours.keys() & theirs.keys())]
    if not differences:
        return math.nan, math.nan, 0
    return (*mean_ci(differences), len(differences))


def signed_drift(values: Sequence[float]) -> float:
    """Mean of the last 10 % of a curve − mean of the 10 % before (at least one round each); nan when the curve
    has too few rounds for two windows. Still learning: > 0; oscillating about a plateau: either sign."""
    window = max(1, round(FLAT_WINDOW * len(values)))
    if len(values) < 2 * window:
        return math.nan
    return statistics.fmean(values[-window:]) - statistics.fmean(values[-2 * window:-window])


def drift(values: Sequence[float]) -> float:
    return abs(signed_drift(values))


def tier_curves(curves: Sequence[Mapping[str, float]]) -> list[list[float]]:
    """A run's curves as the JSON holds them (one record per round) turned into one accuracy curve per tier."""
    return [[c[tier] for c in curves] for tier in curves[0] if tier != "round"]


def run_drift(curves: Sequence[Mapping[str, float]]) -> float:
    """A run's signed drift averaged over its tiers."""
    return statistics.fmean(signed_drift(values) for values in tier_curves(curves))


def flat(curve_values: Sequence[Sequence[float]]) -> bool:
    """Whether a run converged: its accuracy curves (one per tier) drifted less than FLAT_PT over the last 20 % of
    the rounds, averaged over the tiers. A curve too short to judge is not flat."""
    drifts = [drift(values) for values in curve_values]
    return bool(drifts) and statistics.fmean(drifts) < FLAT_PT  # nan compares False


def config_label(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in config.items())


def tuning_scores(tuning_runs: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[dict[str, Any], float, int]]]:
    """Per method, each configuration (in the order first run) with its score averaged over the partitions it was
    tuned on, and how many runs that mean holds."""
    scores: dict[str, dict[str, list[Any]]] = {}
    for run in tuning_runs:
        entry = scores.setdefault(run["method"], {}).setdefault(json.dumps(run["config"], sort_keys=True),
                                                                [run["config"], []])
        entry[1].append(run["score"])
    return {method: [(config, statistics.fmean(values), len(values)) for config, values in configs.values()]
            for method, configs in scores.items()}


def best_configs(tuning_runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The best-scoring configuration per method (the first in grid order on a tie)."""
    return {method: max(configs, key=lambda c: c[1])[0] for method, configs in tuning_scores(tuning_runs).items()}


def tables(result: Mapping[str, Any]) -> dict[str, Any]:
    """Every cell of the report, from the JSON's rows, runs and tuning runs: per arm × partition the accuracy per
    method and tier (mean ± CI over seeds), its worst 10 % of devices where the rows carry it, DRESS − each peer
    paired by seed (accuracy and worst 10 %), DRESS's densest − sparsest tier paired by seed, and compute and
    convergence per method; plus the tuning scores. Methods keep the order the rows first name them in."""
    rows, runs = result["rows"], result["runs"]
    sections = []
    for arm in ARMS:
        for partition in dict.fromkeys(r["partition"] for r in rows if r["arm"] == arm):
            mine = [r for r in rows if r["arm"] == arm and r["partition"] == partition]
            methods = list(dict.fromkeys(r["method"] for r in mine))
            tiers = sorted({r["tier"] for r in mine}, reverse=True)
            accuracy: dict[str, dict[float, Cell]] = {}
            worst10: dict[str, dict[float, Cell]] = {}
            for method in methods:
                accuracy[method], worst10[method] = {}, {}
                for tier in tiers:
                    of_tier = [r for r in mine if r["method"] == method and r["tier"] == tier]
                    if values := [r["accuracy"] for r in of_tier]:
                        accuracy[method][tier] = (*mean_ci(values), len(values))
                    if values := [r["worst10"] for r in of_tier if r.get("worst10") is not None]:
                        worst10[method][tier] = (*mean_ci(values), len(values))
            differences: dict[str, dict[float, Cell]] = {}
            worst10_differences: dict[str, dict[float, Cell]] = {}
            for peer in (m for m in methods if m != REFERENCE and REFERENCE in methods):
                pairs = {tier: paired_difference(rows, REFERENCE, peer, arm, partition, tier) for tier in tiers}
                differences[peer] = {tier: cell for tier, cell in pairs.items() if cell[2]}
                pairs = {tier: paired_difference(rows, REFERENCE, peer, arm, partition, tier, "worst10")
                         for tier in tiers}
                if cells := {tier: cell for tier, cell in pairs.items() if cell[2]}:
                    worst10_differences[peer] = cells
            ours = sorted(accuracy.get(REFERENCE, {}), reverse=True)
            spread = (paired_difference(rows, REFERENCE, REFERENCE, arm, partition, ours[0], peer_tier=ours[-1])
                      if len(ours) > 1 else None)  # DRESS's densest tier − its sparsest, paired by seed
            compute = {}
            for method in methods:
                ran = [r for r in runs if r["arm"] == arm and r["partition"] == partition and r["method"] == method]
                compute[method] = {
                    "device_s": statistics.fmean(r["device_compute_s"] for r in ran),
                    "gmacs": statistics.fmean(r["macs_per_round"] for r in ran) / 1e9,
                    "mb": statistics.fmean(r["bytes_per_round"] for r in ran) / 1e6,
                    "flat": sum(bool(r["flat"]) for r in ran), "runs": len(ran),
                }
            sections.append({
                "arm": arm, "partition": partition, "tiers": tiers, "accuracy": accuracy,
                "seeds": {m: sorted({r["seed"] for r in mine if r["method"] == m}) for m in methods},
                "differences": differences, "compute": compute, "spread": spread,
                "worst10": {method: cells for method, cells in worst10.items() if cells},
                "worst10_differences": worst10_differences,
            })
    tuning_runs = result.get("tuning", {}).get("runs", [])
    best = best_configs(tuning_runs)
    tuning = {method: [{"config": config, "score": score, "runs": n, "best": config == best[method]}
                       for config, score, n in configs]
              for method, configs in tuning_scores(tuning_runs).items()}
    return {"sections": sections, "tuning": tuning}
