"""The run directory a simulation leaves: metrics.json, report.md and PNG plots.

Everything comes from what the deployment also writes, the registry: its rounds table (read by
``Coordinator.rounds``) and its devices with their density histories. The simulation adds which profile each
virtual device has, so the report can show what each kind of device trained.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coordinator.registry.repository import Registry  # noqa: E402
from dress_model.checkpoint import atomic_write  # noqa: E402
from simulations.centralized import CENTRALIZED  # noqa: E402


@dataclass
class RunSummary:
    settings: dict[str, Any]
    rounds: list[dict[str, Any]]  # Coordinator.rounds() entries
    fleet: list[dict[str, Any]]  # per round: density -> device count, at the round's end
    profiles: dict[str, str]  # device name -> profile name
    devices: int
    wall_s: float
    peak_rss_mb: float
    heartbeats: dict[str, float] = field(default_factory=dict)  # the control plane under the fleet (FleetDriver)
    centralized: dict[float, float] = field(default_factory=dict)  # the task trained centrally, per density (if known)
    calibration_source: str = ""  # where the devices' costs came from (simulations.costs)
    ray: dict[str, Any] = field(default_factory=lambda: {"address": "local"})  # where Ray ran (simulations.run)


def fleet_over_time(registry: Registry) -> list[dict[str, Any]]:
    """How many devices ran each density at the end of every recorded round."""
    histories = {d.id: registry.device_history(d.id) for d in registry.list_devices()}
    snapshots = []
    for record in registry.list_rounds():
        counts: Counter[float] = Counter()
        for history in histories.values():
            current = [h.density for h in history if h.assigned_at <= record.recorded_at]
            if current:
                counts[current[-1]] += 1
        snapshots.append({"round": record.round, "at": record.recorded_at.isoformat(), "devices": dict(counts)})
    return snapshots


def densities_per_profile(rounds: list[dict[str, Any]], profiles: dict[str, str]) -> dict[str, dict[str, int]]:
    """Device-rounds per trained density (densest first) of every profile in the fleet.

    Counted from the rounds' participants, not from assignments: what each kind of device actually trained."""
    counts: dict[str, Counter[str]] = {profile: Counter() for profile in sorted(set(profiles.values()))}
    for r in rounds:
        for name, density in r["participants"].items():
            counts[profiles[name]][str(float(density))] += 1
    return {profile: dict(sorted(c.items(), key=lambda kv: -float(kv[0]))) for profile, c in counts.items()}


def profile_table(per_profile: dict[str, dict[str, int]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-profile table (device-rounds per density, mean density): report.md and CLI."""
    trained = sorted({float(d) for counts in per_profile.values() for d in counts}, reverse=True)
    rows = []
    for profile, counts in per_profile.items():
        total = sum(counts.values())
        mean = f"{sum(float(d) * n for d, n in counts.items()) / total:.3f}" if total else "-"  # none trained
        rows.append([profile, *(str(counts.get(str(d), 0)) for d in trained), mean])
    return ["profile", *(f"d={d:g}" for d in trained), "mean density"], rows


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], kind: str = "line",
          levels: dict[str, float] | None = None) -> None:
    """A line or stacked plot; ``levels``: per series label, a dashed level in its colour (a reference)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if kind == "stack":
        xs = next(iter(series.values()))[0] if series else []
        ax.stackplot(xs, *[ys for _, ys in series.values()], labels=list(series))
    else:
        for label, (xs, ys) in series.items():
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            if levels and label in levels:
                ax.axhline(levels[label], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_report(run_dir: Path, summary: RunSummary) -> dict[str, Any]:
    """Writes metrics.json, report.md, accuracy.png, fleet.png, bytes.png into ``run_dir``; returns metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rounds = summary.rounds
    densities = sorted({float(d) for r in rounds for d in r["accuracy"]}, reverse=True)
    xs = [r["round"] for r in rounds]
    _plot(run_dir / "accuracy.png", "Test accuracy per density" + (" (dashed: centralized)" if summary.centralized
                                                                    else ""), "round", "accuracy %",
          {f"d={d:g}": (xs, [r["accuracy"][str(d)] for r in rounds]) for d in densities},
          levels={f"d={d:g}": a for d, a in summary.centralized.items()})
    fleet_densities = sorted({float(d) for s in summary.fleet for d in s["devices"]}, reverse=True)
    _plot(run_dir / "fleet.png", "Devices per assigned density", "round", "devices",
          {f"d={d:g}": ([s["round"] for s in summary.fleet], [s["devices"].get(d, 0) for s in summary.fleet])
           for d in fleet_densities}, kind="stack")
    _plot(run_dir / "bytes.png", "Bytes on the wire per round", "round", "MB",
          {"down": (xs, [sum(map(sum, r["bytes_down"].values())) / 1e6 for r in rounds]),
           "up": (xs, [sum(map(sum, r["bytes_up"].values())) / 1e6 for r in rounds])})

    per_density_bytes = {}
    for r in rounds:
        for d, sizes in r["bytes_down"].items():
            per_density_bytes.setdefault(d, {"down": [], "up": []})["down"] += sizes
        for d, sizes in r["bytes_up"].items():
            per_density_bytes.setdefault(d, {"down": [], "up": []})["up"] += sizes
    bytes_rows = [
        {"density": float(d), "down": _mean(v["down"]), "up": _mean(v["up"])}
        for d, v in sorted(per_density_bytes.items(), key=lambda kv: -float(kv[0]))
    ]
    final = (rounds[-1].get("final_accuracy") or rounds[-1]["accuracy"]) if rounds else {}
    tiers = tier_rows(final, summary.centralized, summary.fleet[-1]["devices"] if summary.fleet else {})
    per_profile = densities_per_profile(rounds, summary.profiles)
    profile_header, profile_rows = profile_table(per_profile)
    metrics = {
        "settings": summary.settings,
        "devices": summary.devices,
        "rounds": len(rounds),
        "wall_s": round(summary.wall_s, 1),
        "peak_rss_mb": round(summary.peak_rss_mb, 1),
        "accuracy": tiers,
        "bytes": bytes_rows,
        "per_round": rounds,
        "fleet": summary.fleet,
        "profiles": per_profile,
        "heartbeats": summary.heartbeats,
        "calibration_source": summary.calibration_source,
        "ray": summary.ray,
    }
    atomic_write(run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    lines = [
        f"# DRESS fleet simulation — {summary.devices} devices, {len(rounds)} rounds",
        "",
        f"Finished {datetime.now().isoformat(timespec='seconds')}; wall {summary.wall_s:.0f} s; "
        f"peak RSS (all processes) {summary.peak_rss_mb:.0f} MB.",
        "",
        *([f"Heartbeats: {h['answered']:,} answered ({h['per_s']:,.0f}/s), {h['lost']} lost, "
           f"p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms; an online device's heartbeats came at most "
           f"{h.get('max_gap_s', 0):g} s apart (p99 {h.get('p99_gap_s', 0):g} s).", ""]
          if (h := summary.heartbeats) else []),
        *([f"Device costs: {summary.calibration_source} (calibration.json).", ""] if summary.calibration_source else []),
        ray_line(summary.ray),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in summary.settings.items()),
        "",
        "## What each tier buys",
        "",
        "The last round's model per density, on the whole test split" + (
            f"; centralized: DRESS trained on the whole training split ({CENTRALIZED.name})."
            if summary.centralized else f"; no centralized reference for this task in {CENTRALIZED.name}."),
        "",
        "| density | devices at the end | accuracy % | over the next sparser | centralized % | gap to centralized |",
        "|---|---|---|---|---|---|",
        *[f"| {t['density']:g} | {t['devices']} | {t['accuracy']:.2f} | {signed_text(t['over_sparser'])} "
          f"| {plain_text(t['centralized'])} | {signed_text(t['gap'])} |" for t in tiers],
        "",
        "## Bytes per device per round (mean)",
        "",
        "| density | down | up |",
        "|---|---|---|",
        *[f"| {row['density']:g} | {row['down']:,.0f} | {row['up']:,.0f} |" for row in bytes_rows],
        "",
        "## Densities trained per profile (device-rounds)",
        "",
        "| " + " | ".join(profile_header) + " |",
        "|" + "---|" * len(profile_header),
        *["| " + " | ".join(row) + " |" for row in profile_rows],
        "",
        "## Rounds",
        "",
        "| round | participants | wall s | slowest device s | all devices s | server s |",
        "|---|---|---|---|---|---|",
        *[f"| {r['round']} | {len(r['participants'])} | {r['wall_s']:.1f} | {r['compute_s']:.1f} "
          f"| {r['device_compute_s']:.1f} | {r['server_s']:.1f} |" for r in rounds],
        "",
        "![accuracy](accuracy.png) ![fleet](fleet.png) ![bytes](bytes.png)",
        "",
    ]
    atomic_write(run_dir / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))
    return metrics


def tier_rows(final: dict[str, float], centralized: dict[float, float], devices: dict[float, int]
              ) -> list[dict[str, Any]]:
    """Per density, densest first: its accuracy, what it adds over the next sparser density, how far it stays
    from centralized training (None where unknown), and how many devices run it at the end."""
    accuracy = sorted(((float(d), a) for d, a in final.items()), reverse=True)
    rows = []
    for i, (d, a) in enumerate(accuracy):
        reference = centralized.get(d)
        rows.append({"density": d, "accuracy": a, "devices": devices.get(d, 0),
                     "over_sparser": a - accuracy[i + 1][1] if i + 1 < len(accuracy) else None,
                     "centralized": reference, "gap": a - reference if reference is not None else None})
    return rows


def ray_line(ray: dict[str, Any]) -> str:
    """Where the virtual devices trained: the Ray started for the run, or an existing cluster's (its size then)."""
    if ray.get("address", "local") == "local":
        return "Ray: started on this machine for the run."
    return (f"Ray: the cluster at `{ray['address']}` ({ray['nodes']} nodes, {ray['cpus']:g} CPUs, "
            f"Ray {ray['version']}); peak RSS counts this machine's processes of the run, not the "
            "cluster's workers.")


def signed_text(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def plain_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0
