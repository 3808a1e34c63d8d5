"""Byzantine devices in a real simulated fleet: a share of the devices reply the reverse of what they trained.

Each run goes through `dress-fleet simulate`'s code (``simulations.run``). The attacked runs submit an app built
on this one whose ClientApp (benchmarks/byzantine_client.py) lies on ``fraction`` of the devices, chosen by seed:
it trains honestly, then replies ``sent - scale * update`` (scale 2.5 by default: no reply of it was rejected by
the server's norm check, coordinator.validation.NORM_FACTOR times the round's median). The clean run has no liars and the fleet's default aggregation (the examples-weighted mean).
Accuracy per tier is the mean of the last ``last`` rounds, then the mean over seeds.

    python -m benchmarks.reliability --only byzantine      # writes the "byzantine" key of reliability.json
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from contracts.settings import APP_CONFIG, RunSettings
from simulations.run import SimulationSettings, run_simulation

CLIENT = Path(__file__).with_name("byzantine_client.py")
CLIENTAPP = 'clientapp = "agent.client_app:app"'
PUBLISHER = 'publisher = "dress-fleet"'


def app_with_liars(directory: Path, devices: int, liars: int, scale: float, seed: int) -> Path:
    """A Flower app in ``directory``: this repository's, with the lying ClientApp and its attack settings."""
    text = APP_CONFIG.read_text()
    for line in (CLIENTAPP, PUBLISHER):
        if line not in text:
            raise RuntimeError(f"{APP_CONFIG} no longer has the line {line!r} that the attacked app replaces")
    text = text.replace(CLIENTAPP, 'clientapp = "byzantine_client:app"').replace(
        PUBLISHER, PUBLISHER + '\nfab-include = ["/byzantine_client.py", "/byzantine.json"]')
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(text)
    shutil.copy(CLIENT, directory / CLIENT.name)
    (directory / "byzantine.json").write_text(json.dumps({"devices": devices, "liars": liars, "scale": scale,
                                                           "seed": seed}))
    return directory


def _last_mean(per_round: list[dict[str, Any]], last: int) -> dict[str, float]:
    tail = per_round[-last:]
    tiers = sorted(tail[-1]["accuracy"], key=float, reverse=True)
    return {f"{float(t):g}": round(statistics.fmean(r["accuracy"][t] for r in tail), 2) for t in tiers}


RUNS = ("clean", "clean-robust", "attacked", "attacked-robust")
"""clean: no liars, the mean; clean-robust: no liars, the robust rule (what the defence costs by itself);
attacked: liars, the mean (no defence); attacked-robust: liars, the robust rule."""


def run_byzantine(fraction: float = 0.1, scale: float = 2.5, robust: str = "trimmed-mean:0.2",
                  seeds: tuple[int, ...] = (0, 1), devices: int = 100, rounds: int = 30, last: int = 10,
                  partition: str = "iid", run_dir: Path = Path("runs/byzantine"), runs: tuple[str, ...] = RUNS,
                  kept: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per seed, each of ``runs`` (``RUNS``); ``kept``: runs measured before, kept unless run again.
    ``accuracy`` is attacked-robust, ``clean_accuracy`` clean, per tier."""
    if unknown := sorted(set(runs) - set(RUNS)):
        raise ValueError(f"unknown Byzantine run(s) {unknown}; expected some of {', '.join(RUNS)}")
    liars = round(fraction * devices)
    measured = [r for r in kept or [] if (r["run"], r["seed"]) not in {(n, s) for n in runs for s in seeds}]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            app = app_with_liars(Path(tmp) / f"app-{seed}", devices, liars, scale, seed)
            for name in runs:
                aggregation = robust if name.endswith("robust") else "mean"
                run = RunSettings.defaults(num_rounds=rounds, partition=partition, seed=seed, max_examples=300,
                                           eval_examples=5000, aggregation=aggregation)
                settings = SimulationSettings(run, devices=devices, run_dir=run_dir / f"{name}-{seed}")
                print(f"== byzantine: {name} ({aggregation}), seed {seed}", flush=True)
                metrics = (run_simulation(settings, app_dir=app) if name.startswith("attacked")
                           else run_simulation(settings))
                rejected = sum(len(r.get("rejected", {})) for r in metrics["per_round"])
                measured.append({"run": name, "aggregation": aggregation, "seed": seed,
                                 "rounds": len(metrics["per_round"]), "accuracy": _last_mean(metrics["per_round"], last),
                                 "rejected_replies": rejected, "wall_s": round(metrics["wall_s"], 1)})

    def mean_of(name: str) -> dict[str, float] | None:
        chosen = [r["accuracy"] for r in measured if r["run"] == name]
        return {t: round(statistics.fmean(a[t] for a in chosen), 2) for t in chosen[0]} if chosen else None

    clean, defended = mean_of("clean"), mean_of("attacked-robust")
    return {"fraction": fraction, "liars": liars, "devices": devices, "attack": f"sign flip x{scale:g}",
            "aggregation": robust, "partition": partition,
            "rounds": rounds, "last": last, "seeds": sorted({r["seed"] for r in measured}),
            "accuracy": defended, "clean_accuracy": clean, "undefended_accuracy": mean_of("attacked"),
            "clean_robust_accuracy": mean_of("clean-robust"),
            "worst_gap": round(max(clean[t] - defended[t] for t in clean), 2) if clean and defended else None,
            "runs": measured}
