"""The federated benchmark's report: ``federated.md`` and one plot per arm × partition, from its JSON alone
(``python -m benchmarks.federated --report``); every table cell comes from ``federated_stats.tables``."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import hms, markdown_table  # noqa: E402
from benchmarks.federated_resume import tuned_keys  # noqa: E402
from benchmarks.federated_stats import (  # noqa: E402
    ARMS,
    MIN_SEEDS,
    REFERENCE,
    ci_text,
    config_label,
    mean_ci,
    run_drift,
    tables,
)
from dress_model.checkpoint import atomic_write  # noqa: E402
from simulations.centralized import centralized_reference  # noqa: E402

TARGET_ARM = "equal-compute"  # the arm issue 24's target is about
ORDER_SLACK_PT = 0.3  # issue 25: a denser tier never more than this below the next sparser
GAP_KEPT = 0.7  # issue 25: federated DRESS keeps at least this share of centralized d=max − d=min, on these:
GAP_KEPT_PARTITIONS = ("iid", "dirichlet:0.3", "profile")
DENSEST_WITHIN_PT = {"iid": 1.5, "dirichlet:0.3": 3.0}  # issue 25: federated d=max at most this below centralized
MARKERS = {"behind": " ▼", "ahead": " ▲", "": ""}  # a paired difference whose interval excludes 0
HETEROFL_MNIST = {  # rates: (IID, non-IID global) %, Flower's baselines/heterofl README
    "a": (99.47, 98.87), "a-e": (99.49, 98.9), "a-b-c-d-e": (99.23, 98.5), "b": (99.54, 98.81),
    "b-e": (99.48, 98.98), "c": (99.37, 97.14), "d": (99.07, 97.58), "e": (98.46, 96.5), "FedAvg": (97.85, 97.74),
}
DEVIATIONS = [
    "Tiers are parameter-matched widths: each peer's tier holds no more parameters than DRESS's subnet at the same "
    "density, rather than the published width rates (HeteroFL's 1, 1/2, 1/4, ...).",
    "FjORD's p-set is our tiers (the widths matching densities 1, 0.5, 0.25, 0.1), not its published uniform grid.",
    "Static BN (no running statistics while training, as HeteroFL and FjORD publish), then recalibrated per width on "
    "1024 server images before evaluation.",
    "HeteroFL's scaler is applied at inference too: the per-width BN statistics that follow it were gathered in "
    "training mode, on scaled activations.",
    "As published, and so here: HeteroFL masks a device's logits to its own labels (masked to 0), clips gradients "
    "to norm 1, averages every element over the devices holding it with one vote per device, and each class's "
    "classifier row over the devices holding that class; FjORD draws a width per batch, per device; FjORD-KD "
    "trains the widest level on the labels every batch and the drawn one on its soft predictions alone.",
    "HeteroFL's 2-labels-per-client split (labels:2): a device dealt the same class twice keeps both shards "
    "(HeteroFL drops the second), so the devices' shards cover the training split.",
    "Every method trains with the same local recipe (Nesterov SGD, momentum 0.9, weight decay 5e-4, a one-cycle "
    "rate within the round, cosine over rounds) and the same tuned server options (TUNING_GRID) rather than "
    "each paper's optimizer settings (HeteroFL: SGD lr 0.01 on MNIST; FjORD: lr 0.1, no momentum).",
    "The peers serve their width model as frozen dense PyTorch (TorchScript/oneDNN); DRESS its packed native "
    "kernel. Each fleet's deadline is relative to the method's own full model (see the calibration).",
    "Server options every method has and tunes (TUNING_GRID): the average of the published model over rounds, "
    "damped aggregation; every method's BN statistics are recomputed per level on server data after each round. "
    "Two DRESS options have no width counterpart: its upper bands start at zero (zeroed width channels get no "
    "gradient and would stay dead), and its anchor loss anneals over the rounds (FjORD-KD's distillation, as "
    "published, has no weight to schedule).",
]
LOGIT_ADJUSTMENT = ("A device-side option every method has and tunes (TUNING_GRID, or the result its configurations "
                    "were borrowed from): logit adjustment, the loss on the logits plus the log of the device's own "
                    "label frequencies (neither peer publishes it; HeteroFL's masking to the device's labels applies "
                    "after it).")


def plot_name(out: Path, arm: str, partition: str) -> str:
    """Named after the results file, so that two result sets never share a plot."""
    return f"{out.stem}-{arm}-{partition.replace(':', '')}.png"


def plot(path: Path, section: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Mean accuracy per round over the seeds, one panel per tier, one line per method."""
    tiers = section["tiers"]
    fig, axes = plt.subplots(1, len(tiers), figsize=(4 * len(tiers), 3.6), dpi=100, sharey=True, squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        for method in section["accuracy"]:
            mine = [r for r in runs if (r["arm"], r["partition"], r["method"]) == (section["arm"], section["partition"], method)]
            key = f"{tier:g}"
            if key not in mine[0]["curves"][0]:
                continue
            xs = [c["round"] for c in mine[0]["curves"]]
            ax.plot(xs, [statistics.fmean(r["curves"][i][key] for r in mine) for i in range(len(xs))], label=method)
        ax.set_title(f"d={tier:g} — {section['arm']}, {section['partition']}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (mean over seeds)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def side(mean: float, half: float) -> str:
    """Where DRESS stands when a difference's interval excludes 0 (a nan interval excludes nothing)."""
    return "behind" if mean + half < 0 else "ahead" if mean - half > 0 else ""


def rounds_text(s: dict[str, Any]) -> str:
    """How many rounds a comparison run took: one count, or IID's and the other partitions'."""
    other = s.get("non_iid_rounds", s["rounds"])  # a file from before non-IID partitions had their own count
    if other == s["rounds"] or s["partitions"] == ["iid"]:
        return f"{s['rounds']} rounds"
    if "iid" not in s["partitions"]:
        return f"{other} rounds"
    return f"{s['rounds']} rounds on IID data, {other} on the other partitions"


def summary_markdown(result: dict[str, Any], out: Path) -> str:
    s, t = result["settings"], tables(result)
    examples = f"up to {s['max_examples']} examples" if s["max_examples"] else "its whole shard"
    lines = [f"# Federated DRESS vs peers, issue 24's protocol — {s['task']}", "", f"`{result['command']}`", "",
             f"Profile {s['profile']}: {s['devices']} devices ({s['mix']}), every one at its full budget and always "
             f"online (traces {s['traces']}, dropout {s['dropout']:g}), so that for one seed every method trains the "
             f"same devices in the same rounds on the same shards. {rounds_text(s)}, {s['fraction']:g} of the fleet "
             f"per round, {examples} per device, {s['epochs']:g} local epochs. Each method's fleet deadline: "
             f"{s['deadline']:g} × its own full model's latency (its calibration below). Curves: accuracy on "
             f"{s['eval_examples']} test images per round. Tables: the last round's published model on the whole test "
             "split per tier, mean ± 95 % CI (t-distribution over seeds; one seed has none).", "",
             "Arms: **equal-rounds** — every method trains its local epochs with its own step; **equal-compute** — "
             "a device at tier t spends per example its local epochs × t × a trained pass of the full model's MACs, "
             "and each method fits its steps into that.", ""]
    lines += seeds_lines(result)
    lines += [f"Wall time summed over the {len(result['runs']) + len(result['tuning']['runs'])} runs: "
              f"{hms(result['wall_s'])} (tuning {hms(sum(r['wall_s'] for r in result['tuning']['runs']))}).", ""]
    reference = centralized_reference(s["task"])
    lines += target_lines(t["sections"], reference) + centralized_lines(t["sections"], reference)
    lines += calibration_lines(result) + tuning_lines(result, t["tuning"])
    for section in t["sections"]:
        lines += section_lines(section, out)
    lines += convergence_lines(result)
    if s["dataset"] == "mnist":
        lines += published_mnist_lines()
    deviations = DEVIATIONS + ([LOGIT_ADJUSTMENT] if "logit_adjust" in tuned_keys(s) else [])  # tuned or borrowed
    lines += ["## Deviations from the published peers", "", *(f"- {d}" for d in deviations), ""]
    return "\n".join(lines)


def seeds_lines(result: dict[str, Any]) -> list[str]:
    """Whether every cell ran the seeds its command asked for (else the file is not a result yet), and whether
    those are as many as issue 24's matrix needs (issue 25's capacity comparison asks for 3)."""
    s = result["settings"]
    done = {arm: min((len({r["seed"] for r in result["runs"]
                           if (r["arm"], r["method"], r["partition"]) == (arm, method, partition)})
                      for method in s["methods"] for partition in s["partitions"]), default=0)
            for arm in s["seeds"]}  # the seeds every method and partition of an arm has run
    unfinished = {arm: n for arm, n in done.items() if n < len(s["seeds"][arm])}
    short = {arm: n for arm, n in done.items() if n < MIN_SEEDS[arm]}
    if unfinished:
        return ["**Not a result yet:** not every cell has run its seeds ("
                + ", ".join(f"{arm} {n} of {len(s['seeds'][arm])}" for arm, n in unfinished.items())
                + "); `--resume` continues the matrix.", ""]
    if short:
        return ["Fewer seeds than issue 24's matrix asks for in every cell ("
                + ", ".join(f"{arm} {n} of {MIN_SEEDS[arm]}" for arm, n in short.items())
                + "); every seed this command asked for ran.", ""]
    return []


def target_lines(sections: list[dict[str, Any]], reference: dict[float, float] | None = None) -> list[str]:
    """Issue 24's target read off the tables: the equal-compute cells where DRESS − peer lies wholly below 0; and,
    as issue 25 asks, where DRESS's denser tier falls more than ORDER_SLACK_PT below the next sparser one, where its
    worst 10 % of devices fare worse than a peer's, and (given centralized DRESS per density, ``reference``) where
    it misses the share of the centralized gain or the distance to centralized d=max."""
    behind, unordered, worse = [], [], []
    for section in (x for x in sections if x["arm"] == TARGET_ARM):
        behind += behind_cells(section, "differences")
        worse += behind_cells(section, "worst10_differences")
        ours = section["accuracy"].get("dress", {})
        tiers = [tier for tier in sorted(section["tiers"], reverse=True) if tier in ours]
        unordered += [f"{section['partition']} d={denser:g} {ours[denser][0]:.2f} < "
                      f"d={sparser:g} {ours[sparser][0]:.2f}" for denser, sparser in zip(tiers, tiers[1:])
                      if ours[denser][0] < ours[sparser][0] - ORDER_SLACK_PT]
    return ["## Against the targets", "",
            f"- {TARGET_ARM} arm, DRESS − peer intervals wholly below 0 (issue 24: none): "
            + ("; ".join(behind) if behind else "none") + ".",
            f"- DRESS's tiers out of order, a denser one more than {ORDER_SLACK_PT:g} pt below the next sparser "
            "(issue 25: none): " + ("; ".join(unordered) if unordered else "none") + ".",
            f"- {TARGET_ARM} arm, DRESS − peer on the worst 10 % of devices, intervals wholly below 0 (issue 25: "
            "none): " + ("; ".join(worse) if worse else "none") + ".",
            *centralized_target(sections, reference), ""]


def behind_cells(section: dict[str, Any], table: str) -> list[str]:
    """The cells of a section's DRESS − peer ``table`` whose interval lies wholly below 0, as the targets name them."""
    return [f"{section['partition']} d={tier:g}: DRESS − {peer} {ci_text(*cells[tier][:2], sign='+')}"
            for peer, cells in section[table].items()
            for tier in section["tiers"] if tier in cells and side(*cells[tier][:2]) == "behind"]


def difference_text(cell: tuple[float, float, int]) -> str:
    """A DRESS − peer cell as the tables print it: signed, marked where its interval excludes 0."""
    return ci_text(*cell[:2], sign="+") + MARKERS[side(*cell[:2])]


def centralized_target(sections: list[dict[str, Any]], reference: dict[float, float] | None) -> list[str]:
    """The target line for issue 25's distance to centralized training; none when the task has no reference."""
    if not reference:
        return []
    missed = [f"{c['partition']}: {m}" for c in centralized_cells(sections, reference) for m in c["missed"]]
    return ["- Against centralized DRESS (issue 25: none missed): " + ("; ".join(missed) if missed else "none") + "."]


def percent(share: float) -> str:
    return f"{share * 100:.0f} %"


def centralized_cells(sections: list[dict[str, Any]], reference: dict[float, float]) -> list[dict[str, Any]]:
    """Per partition of the target arm, DRESS in the fleet against DRESS trained centrally (``reference``: accuracy
    per density): at the densest tier, and in what its densest tier gains over its sparsest (the fleet's gain paired
    by seed; its share of the centralized one), with the issue 25 targets each misses."""
    cells = []
    for section in (x for x in sections if x["arm"] == TARGET_ARM and x["spread"] and x["spread"][2]):
        tiers = sorted(section["accuracy"][REFERENCE], reverse=True)
        if {tiers[0], tiers[-1]} - reference.keys():
            continue
        densest, spread = section["accuracy"][REFERENCE][tiers[0]], section["spread"]
        gap = reference[tiers[0]] - reference[tiers[-1]]
        kept = spread[0] / gap if gap > 0 else math.nan
        below, within = reference[tiers[0]] - densest[0], DENSEST_WITHIN_PT.get(section["partition"])
        missed = ([f"d={tiers[0]:g} {below:.2f} pt below centralized (at most {within:g})"]
                  if within is not None and below > within else [])
        if section["partition"] in GAP_KEPT_PARTITIONS and not kept >= GAP_KEPT:  # nan (no gain to keep) misses
            missed.append(f"keeps {percent(kept)} of the centralized d={tiers[0]:g} − d={tiers[-1]:g} gain (at "
                          f"least {percent(GAP_KEPT)})")
        cells.append({"partition": section["partition"], "densest": tiers[0], "sparsest": tiers[-1],
                      "centralized": reference[tiers[0]], "federated": densest, "gap": gap, "spread": spread,
                      "kept": kept, "missed": missed})
    return cells


def centralized_lines(sections: list[dict[str, Any]], reference: dict[float, float]) -> list[str]:
    """The table behind the centralized target; nothing when the task was never trained centrally."""
    cells = centralized_cells(sections, reference) if reference else []
    if not cells:
        return []
    rows = [{"partition": c["partition"], "centralized d=max": f"{c['centralized']:.2f}",
             "fleet d=max": ci_text(*c["federated"][:2]),
             "fleet − centralized": f"{c['federated'][0] - c['centralized']:+.2f}",
             "centralized d=max − d=min": f"{c['gap']:+.2f}",
             "fleet d=max − d=min": ci_text(*c["spread"][:2], sign="+"),
             "share kept": "—" if math.isnan(c["kept"]) else percent(c["kept"]),
             "issue 25": "; ".join(c["missed"]) or "met"} for c in cells]
    columns = ["partition", "centralized d=max", "fleet d=max", "fleet − centralized", "centralized d=max − d=min",
               "fleet d=max − d=min", "share kept", "issue 25"]
    return ["## Against centralized training", "",
            f"DRESS in the fleet ({TARGET_ARM} arm) against DRESS trained centrally on the whole training split "
            "(`simulations/centralized.json`: `benchmarks/results/accuracy.json`'s mean over its seeds); d=max is "
            f"{cells[0]['densest']:g}, d=min {cells[0]['sparsest']:g}. The fleet's d=max − d=min is paired by seed. "
            f"Issue 25 asks that the fleet keep at least {percent(GAP_KEPT)} of the centralized gain on "
            f"{', '.join(GAP_KEPT_PARTITIONS)}, with d=max at most "
            + ", ".join(f"{pt:g} pt below centralized on {p}" for p, pt in DENSEST_WITHIN_PT.items()) + ".", "",
            markdown_table(rows, columns), ""]


def published_mnist_lines() -> list[str]:
    """HeteroFL's own MNIST numbers, beside which this file's rows stand (not the same model or budget)."""
    rows = [{"HeteroFL model rates": rates, "IID": iid, "non-IID (2 labels), global": global_}
            for rates, (iid, global_) in HETEROFL_MNIST.items()]
    return ["## HeteroFL as published on MNIST", "",
            "From Flower's `baselines/heterofl` README (Diao et al. 2021): a 4-layer CNN of 64-128-256-512 channels, "
            "100 clients, 5 local epochs, SGD lr 0.01, 200 rounds IID / 400 non-IID, rates a = 1, b = 1/2, c = 1/4, "
            "d = 1/8, e = 1/16 drawn per round ('dynamic'); accuracy of the global model (the largest rate). Our "
            "cnn is far smaller and trains far fewer rounds; the rows above are on our own fleet.", "",
            markdown_table(rows, ["HeteroFL model rates", "IID", "non-IID (2 labels), global"]), ""]


def calibration_lines(result: dict[str, Any]) -> list[str]:
    tiers = sorted({p["density"] for ps in result["calibration"].values() for p in ps}, reverse=True)
    table = [{"method": method, **{f"d={p['density']:g}": f"{p['latency_ms']:.3f} / {p['train_ms']:.1f}" for p in ps}}
             for method, ps in result["calibration"].items()]
    return ["## Calibration", "", "Each method's fleet was built from its own model's calibration on this machine "
            "(laptop-x86; the other profiles scale it by their speed): ms of a batch-1 answer / of a training step.", "",
            markdown_table(table, ["method", *(f"d={d:g}" for d in tiers)])]


def tuning_lines(result: dict[str, Any], tuning: dict[str, list[dict[str, Any]]]) -> list[str]:
    s = result["settings"]
    if not s["tune"]:
        configs = "; ".join(f"{m}: {config_label(c)}" for m, c in result["tuning"]["best"].items())
        borrowed = s.get("configs_from")
        if borrowed:
            return ["## Tuning", "", f"Not tuned here (`--configs-from {borrowed['file']}`): every method ran the "
                    f"configuration its tuning on {borrowed['task']} chose, the same grid and budget for each "
                    f"({configs}).", ""]
        return ["## Tuning", "", f"Not tuned (`--no-tune`): every method ran the app's defaults ({configs}).", ""]
    tuning_settings = s["tuning"]
    grid = tuning_settings["grid"]  # every configuration tried, in the order the benchmark tried them
    labels = [config_label(dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    table = []
    for method, configs in tuning.items():
        scores = {config_label(c["config"]): f"**{c['score']:.2f}**" if c["best"] else f"{c['score']:.2f}"
                  for c in configs}
        table.append({"method": method, **{label: scores.get(label, "—") for label in labels}})
    return ["## Tuning", "",
            f"Every method tried the same {len(labels)} configurations, one run each on "
            f"{', '.join(tuning_settings['partitions'])}, seed {tuning_settings['seed']}, "
            f"{tuning_settings.get('rounds', s['rounds'])} rounds, in the "
            f"{tuning_settings['arm']} arm, scored on {tuning_settings['validation']:,} training images held out from "
            "every shard (never the test split): the last round's model, mean over tiers (%). Bold: the method's "
            "configuration in both arms.", "", markdown_table(table, ["method", *labels])]


def section_lines(section: dict[str, Any], out: Path) -> list[str]:
    tiers, columns = section["tiers"], [f"d={t:g}" for t in section["tiers"]]
    accuracy = [{"method": method, **{f"d={t:g}": ci_text(*cells[t][:2]) if t in cells else "—" for t in tiers},
                 "seeds": ",".join(map(str, section["seeds"][method]))}
                for method, cells in section["accuracy"].items()]
    differences = []
    for peer, cells in section["differences"].items():
        sides = {t: side(*cells[t][:2]) for t in cells}
        differences.append({
            "peer": peer,
            **{f"d={t:g}": difference_text(cells[t]) if t in cells else "—" for t in tiers},
            **{f"DRESS {where} at": ", ".join(f"d={t:g}" for t in cells if sides[t] == where) or "—"
               for where in ("behind", "ahead")},
        })
    compute = [{"method": method, "device s/round": f"{c['device_s']:.2f}", "GMACs/round": f"{c['gmacs']:.2f}",
                "MB/round": f"{c['mb']:.2f}", "flat runs": f"{c['flat']}/{c['runs']}"}
               for method, c in section["compute"].items()]
    lines = [f"## {section['arm']} — {section['partition']}", "",
             "Accuracy % of the last round's model on the whole test split, mean ± 95 % CI over the seeds listed:", "",
             markdown_table(accuracy, ["method", *columns, "seeds"])]
    if section["worst10"]:
        worst = [{"method": method, **{f"d={t:g}": ci_text(*cells[t][:2]) if t in cells else "—" for t in tiers},
                  "seeds": max(cell[2] for cell in cells.values())}
                 for method, cells in section["worst10"].items()]
        lines += ["The worst 10 % of each tier's devices, on their own classes (the tier's model on the test split, "
                  "per class, weighted by the device's label histogram), mean ± 95 % CI over seeds:", "",
                  markdown_table(worst, ["method", *columns, "seeds"])]
    if section["worst10_differences"]:
        worst_differences = [{"peer": peer, **{f"d={t:g}": difference_text(cells[t]) if t in cells else "—"
                                               for t in tiers}}
                             for peer, cells in section["worst10_differences"].items()]
        lines += ["DRESS − peer on the worst 10 % of devices, paired by seed, mean ± 95 % CI (▼ ▲ as below):", "",
                  markdown_table(worst_differences, ["peer", *columns])]
    if differences:
        lines += ["DRESS − peer in points, paired by seed, mean ± 95 % CI; ▼ the interval lies wholly below 0 (DRESS "
                  "behind), ▲ wholly above (DRESS ahead):", "",
                  markdown_table(differences, ["peer", *columns, "DRESS behind at", "DRESS ahead at"])]
    lines += ["Compute per round, mean over the runs (device s: all devices' measured training time added up), and "
              "how many runs were flat:", "",
              markdown_table(compute, ["method", "device s/round", "GMACs/round", "MB/round", "flat runs"]),
              f"![curves]({plot_name(out, section['arm'], section['partition'])})", ""]
    return lines


def convergence_lines(result: dict[str, Any]) -> list[str]:
    if not result["runs"]:
        return []
    lines = ["## Convergence", "", "A run is flat when its per-round accuracy moved less than 0.2 pt over the last "
             "20 % of its rounds (mean of the last 10 % against the 10 % before, averaged over tiers).", ""]
    for arm in ARMS:
        mine = [r for r in result["runs"] if r["arm"] == arm]
        steep = [f"{r['method']} {r['partition']} seed {r['seed']}" for r in mine if not r["flat"]]
        if mine:
            lines.append(f"- {arm}: {len(mine) - len(steep)} of {len(mine)} runs flat"
                         + (f"; not flat: {', '.join(steep)}" if steep else ""))
    rows = []
    for arm in ARMS:
        for partition in dict.fromkeys(r["partition"] for r in result["runs"] if r["arm"] == arm):
            mine = [r for r in result["runs"] if r["arm"] == arm and r["partition"] == partition]
            drifts = [run_drift(r["curves"]) for r in mine]
            rows.append({"arm": arm, "partition": partition, "flat runs": f"{sum(r['flat'] for r in mine)}/{len(mine)}",
                         "drift, pt": ci_text(*mean_ci(drifts), sign="+"),
                         "up / down": f"{sum(d > 0 for d in drifts)} / {sum(d < 0 for d in drifts)}"})
    return lines + ["", "Whether the runs that are not flat still learn or oscillate about a plateau: each run's "
                    "signed drift (the same two windows, the later minus the earlier, averaged over tiers), mean ± "
                    "95 % CI over the cell's runs and how many drifted up or down. Runs still learning drift up "
                    "together; oscillating ones drift either way and average to about 0.", "",
                    markdown_table(rows, ["arm", "partition", "flat runs", "drift, pt", "up / down"])]


def write_report(out: Path, result: dict[str, Any]) -> str:
    """federated.md and one plot per arm × partition, from the JSON's rows and runs; returns the markdown."""
    for section in tables(result)["sections"]:
        plot(out.with_name(plot_name(out, section["arm"], section["partition"])), section, result["runs"])
    text = summary_markdown(result, out)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    return text
