"""Which way of training DRESS lets a fleet's denser subnets learn (issue 25): variants side by side, held-out seeds.

    python -m benchmarks.federated_ablation              # every variant × partition × seed on the capacity task
    python -m benchmarks.federated_ablation --resume     # continue a stopped one (the JSON is written per run)
    python -m benchmarks.federated_ablation --report     # rewrite the markdown from the JSON alone
    python -m benchmarks.federated_ablation --variants own,own-drawn --baseline own \
        --out benchmarks/results/federated-ablation-drawn.json   # two rules, paired with the default's

Each variant is DRESS with a few run settings changed (VARIANTS), on `federated.py`'s fleet and protocol (its
full profile: 100 devices, every one at its full budget, the same devices each round for every variant, the
equal-compute arm) and DRESS's tuned server settings from `federated.json`. Every variant runs on one fleet,
built from one calibration (the first variant's, measured once and kept in the JSON), so variants differ only
in how devices train: a compute-matched device's budget is counted in MACs, and a variant whose step costs
fewer takes more steps. (Calibrated apart on a busy machine, one variant's training steps timed 2-3x another's
and its fleet trained the sparsest tier in 40 % fewer device-rounds.) Scores are on
10,000 training images held out of every shard, never the test split, on seeds none of the comparisons use:
the variant kept is then measured on the comparison's own seeds by `federated.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import Task, command, hms, machine, markdown_table, write_json
from benchmarks.federated import (
    PROFILES,
    RESULTS,
    TUNING,
    TUNING_ARM,
    TUNING_GRID,
    TUNING_VALIDATION,
    Job,
    curves_of,
    default_task,
    device_rounds,
    final_accuracy,
    is_flat,
    simulate,
    task_arg,
)
from benchmarks.federated_resume import with_added_grid
from benchmarks.federated_stats import best_configs, ci_text, mean_ci
from contracts.policy import CalibrationPoint
from contracts.settings import RunSettings
from runtime.processes import stop_on_sigterm
from simulations.costs import measure_calibration
from simulations.fleet import write_calibration

VARIANTS: dict[str, dict[str, Any]] = {
    "mean+anchor": {"joint": "all", "distill": 0.5},  # every density each step, mean loss, anchored to the sparsest
    # received: the app's default until issue 25 chose own
    "mean": {"distill": 0.0},  # the same without the anchor
    "sum": {"joint": "sum", "distill": 0.0},  # every density each step, losses summed: the densest band's whole gradient
    "sandwich": {"joint": "sandwich", "distill": 0.0},  # the densest on labels, two smaller ones from its predictions
    "band": {"joint": "band", "distill": 0.0},  # every density each step, each weight by its subnets' mean gradient
    "own": {"joint": "own", "distill": 0.0},  # a device's own density alone: more steps for the same compute
    "ends": {"joint": "ends", "distill": 0.0},  # its own density and the sparsest, summed
    "sandwich-labels": {"joint": "sandwich-labels", "distill": 0.0},  # ends and one drawn between, on the labels
    "own-drawn": {"joint": "own-drawn", "distill": 0.0},  # one density a step: its own on half, a sparser one drawn
    # its own density, the loss on logits plus the log of the device's label frequencies (balanced softmax, tau 1)
    "own+adjust": {"joint": "own", "distill": 0.0, "logit_adjust": 1.0},
    # its own density, anchored all run long (0.3) to the sparsest it received: what the fleet's weak devices taught
    "own+anchor": {"joint": "own", "distill": 0.3, "distill_decay": 1.0},
    "own-undamped": {"joint": "own", "distill": 0.0, "damped": False},  # a band moves all the way to its trainers'
    # its own density; each round the server distils the round's devices, as an ensemble, into every density (FedDF)
    "own+server-distill": {"joint": "own", "distill": 0.0, "server_distill": 20},
    "own-drawn-undamped": {"joint": "own-drawn", "distill": 0.0, "damped": False},  # own-drawn and undamped, together
}
BASELINE = "mean+anchor"
SEEDS = "200,201,202"  # held out: neither tuning (100) nor the comparisons (0-4) use them
PARTITIONS = "iid,dirichlet:0.3"
ARM = TUNING_ARM  # the equal-compute arm, as federated.py tunes in it
FLEET = ("devices", "rounds", "fraction", "epochs", "max_examples", "eval_examples")  # federated.py's full profile


def tuned_dress(path: Path) -> dict[str, Any]:
    """DRESS's configuration as `federated.py` tuned it (its JSON's tuning runs)."""
    result = with_added_grid(json.loads(path.read_text()), TUNING_GRID)
    return best_configs(result["tuning"]["runs"])["dress"]


def run_settings(args: argparse.Namespace, variant: str, partition: str, seed: int) -> RunSettings:
    """A variant's run: a tuning run of federated.py's (held-out scoring, equal-compute) with the variant's
    settings over DRESS's tuned ones."""
    return Job(TUNING, "dress", partition, seed, {**args.base, **VARIANTS[variant]}).run_settings(args)


def paired(runs: list[dict[str, Any]], variant: str, baseline: str, partition: str, tier: str
           ) -> tuple[float, float]:
    """``variant`` − ``baseline`` at ``tier`` on ``partition``, paired by seed: mean and CI half-width (nan when
    no seed has both)."""
    of = {(r["variant"], r["seed"]): r["final_accuracy"][tier] for r in runs if r["partition"] == partition}
    diffs = [of[variant, s] - of[baseline, s] for v, s in of if v == variant and (baseline, s) in of]
    return mean_ci(diffs) if diffs else (math.nan, math.nan)


def report(result: dict[str, Any]) -> str:
    """The markdown: per partition, each variant's accuracy per tier and its paired difference to the baseline."""
    runs, s = result["runs"], result["settings"]
    baseline = s.get("baseline", BASELINE)
    tiers = [f"{d:g}" for d in sorted(s["densities"], reverse=True)]
    lines = [f"# Federated DRESS variants — {s['task']}, held-out seeds", "", f"`{result['command']}`", "",
             f"{s['devices']} devices, {s['rounds']} rounds, {s['fraction']} of the fleet per round, {s['epochs']:g} "
             f"local epochs ({ARM}), DRESS's tuned server settings {s['base']}. Scores: the last round's model on "
             f"{TUNING_VALIDATION:,} training images held out of every shard (not the test split), mean ± 95 % CI "
             "over seeds; Δ: paired by seed against " + baseline + ".", "",
             "Variants: " + "; ".join(f"**{v}** {VARIANTS[v]}" for v in s["variants"]) + ".",
             "", f"Wall time summed over {len(runs)} runs: {hms(sum(r['wall_s'] for r in runs))}.", ""]
    for partition in s["partitions"]:
        rows = []
        for variant in s["variants"]:
            mine = [r for r in runs if r["partition"] == partition and r["variant"] == variant]
            if not mine:
                continue
            row: dict[str, Any] = {"variant": variant, "seeds": ",".join(str(r["seed"]) for r in mine)}
            for tier in tiers:
                row[f"d={tier}"] = ci_text(*mean_ci(r["final_accuracy"][tier] for r in mine))
                if variant != baseline:
                    row[f"d={tier}"] += f" (Δ {ci_text(*paired(runs, variant, baseline, partition, tier), sign='+')})"
            row["d=max − d=min"] = ci_text(*mean_ci(r["final_accuracy"][tiers[0]] - r["final_accuracy"][tiers[-1]]
                                                    for r in mine), sign="+")
            row["device-rounds per tier"] = " / ".join(str(sum(r["device_rounds"].get(t, 0) for r in mine))
                                                      for t in tiers)
            row["flat"] = f"{sum(r['flat'] for r in mine)}/{len(mine)}"
            rows.append(row)
        lines += [f"## {partition}", "", markdown_table(rows, list(rows[0]) if rows else ["variant"]), ""]
    return "\n".join(lines)


def main() -> None:
    stop_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", type=task_arg, default=Task("fashion-mnist", "cnn", 2),
                   help=f"DATASET-MODEL[-wWIDTH] (default: issue 25's capacity task; the app's is {default_task().name})")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--baseline", default=BASELINE,
                   help="the variant every other one is paired with by seed (one of --variants)")
    p.add_argument("--partitions", default=PARTITIONS)
    p.add_argument("--seeds", default=SEEDS)
    p.add_argument("--tuned", type=Path, default=RESULTS / "federated.json",
                   help="the federated comparison whose DRESS tuning gives the server settings")
    p.add_argument("--out", type=Path, default=RESULTS / "federated-ablation.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/federated-ablation"))
    p.add_argument("--resume", action="store_true", help="keep --out's runs and run the rest")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from --out's JSON")
    args = p.parse_args()
    md = args.out.with_suffix(".md")
    if args.report:
        md.write_text(report(json.loads(args.out.read_text())))
        return
    for key in FLEET:
        setattr(args, key, PROFILES["full"][key])
    args.rounds = args.tuning_rounds = PROFILES["full"]["tuning_rounds"]  # a variant is a selection, as tuning is
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    if args.baseline not in variants:
        raise SystemExit(f"--variants must include the baseline {args.baseline}: every other one is compared with it")
    partitions = [x for x in args.partitions.split(",") if x]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError as e:
        raise SystemExit(f"--seeds must be comma-separated integers: {e}") from None
    args.base = tuned_dress(args.tuned)
    args.mix = RunSettings.defaults().mix
    for variant in variants:  # every run's settings checked before the first one starts
        run_settings(args, variant, partitions[0], seeds[0])

    settings = {"task": args.task.name, "base": args.base, "baseline": args.baseline, "variants": variants,
                "partitions": partitions, "seeds": seeds,
                "densities": list(run_settings(args, args.baseline, partitions[0], seeds[0]).density_list),
                **{k: getattr(args, k) for k in FLEET}}
    previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
    fixed = ("task", "base", "baseline", "densities", *FLEET)
    before = {"baseline": BASELINE, **previous["settings"]} if previous else {}  # files before --baseline: its default
    if previous and any(before[k] != settings[k] for k in fixed):
        raise SystemExit(f"{args.out} was run with other settings ({', '.join(fixed)} must match): another --out")
    if previous:  # variants, partitions and seeds may grow
        for key in ("variants", "partitions", "seeds"):
            settings[key] = list(dict.fromkeys([*previous["settings"][key], *settings[key]]))
    commands = [*(previous["command"].split(" && ") if previous else []), command()]
    runs: list[dict[str, Any]] = previous["runs"] if previous else []
    calibration: list[dict[str, float]] = previous["calibration"] if previous else []
    done = {(r["variant"], r["partition"], r["seed"]) for r in runs}
    jobs = [(v, part, seed) for seed in seeds for part in partitions for v in variants if (v, part, seed) not in done]
    for i, (variant, partition, seed) in enumerate(jobs, 1):
        run = run_settings(args, variant, partition, seed)
        if not calibration:
            print(f"calibrating the fleet on this machine ({variant}'s training step)", flush=True)
            calibration = [dataclasses.asdict(c) for c in measure_calibration(run)]
        calibration_file = args.run_dir / "calibration.json"
        write_calibration(calibration_file, run.model_label, [CalibrationPoint(**c) for c in calibration])
        print(f"== [{i}/{len(jobs)}] {variant} {partition} seed {seed}", flush=True)
        metrics = simulate(Job(ARM, "dress", partition, seed, {}), run,
                           argparse.Namespace(**{**vars(args), "run_dir": args.run_dir / variant}), calibration_file)
        curves = curves_of("dress", metrics, run.density_list)
        runs.append({"task": args.task.name, "variant": variant, "partition": partition, "seed": seed,
                     "final_accuracy": final_accuracy("dress", metrics, run.density_list), "curves": curves,
                     "flat": is_flat(curves), "device_rounds": device_rounds(metrics["per_round"]), "wall_s": metrics["wall_s"],
                     "macs_per_round": statistics.fmean(r["device_macs"] for r in metrics["per_round"])})
        result = {"command": " && ".join(dict.fromkeys(commands)), "machine": machine(), "settings": settings, "calibration": calibration,
                  "runs": runs}
        write_json(args.out, result)
        md.write_text(report(result))
    print(md.read_text() if md.is_file() else "nothing to run")


if __name__ == "__main__":
    main()
