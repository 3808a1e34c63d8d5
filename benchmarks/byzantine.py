"""Byzantine devices in a real simulated fleet: a share of the devices reply the reverse of what they trained.

Each run goes through `dress-fleet simulate`'s code (``simulations.run``). The attacked runs submit an app built
on this one whose ClientApp (benchmarks/byzantine_client.py) lies on ``fraction`` of the devices, chosen by seed:
it trains honestly, then replies ``sent - scale * update`` (scale 2.5 by default: no reply of it was rejected by
the server's norm check, coordinator.validation.NORM_FACTOR times the round's median). The clean run has no liars and the fleet's default aggregation (the examples-weighted mean).
Accuracy per tier is the mean of the last ``last`` rounds, then the mean over seeds.

    python benchmarks/reliability.py --only byzantine      # writes the "byzantine" key of reliability.json
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
FAB_INCLUDE = 'fab-include = ["/README.md"]'


def app_with_liars(directory: Path, devices: int, liars: int, scale: float, seed: int) -> Path:
    """A Flower app in ``directory``: this repository's, with the lying ClientApp and its attack settings."""
    text = APP_CONFIG.read_text()
    for line in (CLIENTAPP, FAB_INCLUDE):
        if line not in text:
            raise RuntimeError(f"{APP_CONFIG} no longer has the line {line!r} that the attacked app replaces")
    text = text.replace(CLIENTAPP, 'clientapp = "byzantine_client:app"').replace(
        FAB_INCLUDE, 'fab-include = ["/byzantine_client.py", "/byzantine.json"]')
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


def run_byzantine(fraction: float = 0.1, scale: float = 2.5, robust: str = "trimmed-mean:0.2",
                  seeds: tuple[int, ...] = (0, 1), devices: int = 100, rounds: int = 30, last: int = 10,
                  partition: str = "iid", run_dir: Path = Path("runs/byzantine")) -> dict[str, Any]:
    """Per seed: the clean run (mean), then the attacked runs with the mean (no defence) and with ``robust``.
    ``accuracy`` is the attacked run with ``robust``; ``clean_accuracy`` the clean run; both per tier."""
    liars = round(fraction * devices)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            app = app_with_liars(Path(tmp) / f"app-{seed}", devices, liars, scale, seed)
            for name, aggregation, attacked in (("clean", "mean", False), ("attacked", "mean", True),
                                                ("attacked", robust, True)):
                run = RunSettings.defaults(num_rounds=rounds, partition=partition, seed=seed, max_examples=300,
                                           eval_examples=5000, aggregation=aggregation)
                label = f"{name}-{aggregation.replace(':', '')}-{seed}"
                settings = SimulationSettings(run, devices=devices, run_dir=run_dir / label)
                print(f"== byzantine: {label}", flush=True)
                metrics = (run_simulation(settings, app_dir=app) if attacked else run_simulation(settings))
                rejected = sum(len(r.get("rejected", {})) for r in metrics["per_round"])
                runs.append({"run": name, "aggregation": aggregation, "seed": seed, "rounds": len(metrics["per_round"]),
                             "accuracy": _last_mean(metrics["per_round"], last), "rejected_replies": rejected,
                             "wall_s": round(metrics["wall_s"], 1)})

    def mean_of(name: str, aggregation: str) -> dict[str, float]:
        chosen = [r["accuracy"] for r in runs if r["run"] == name and r["aggregation"] == aggregation]
        return {t: round(statistics.fmean(a[t] for a in chosen), 2) for t in chosen[0]}

    clean, defended, undefended = mean_of("clean", "mean"), mean_of("attacked", robust), mean_of("attacked", "mean")
    return {"fraction": fraction, "liars": liars, "devices": devices, "attack": f"sign flip x{scale:g}",
            "aggregation": robust, "partition": partition, "rounds": rounds, "last": last, "seeds": list(seeds),
            "accuracy": defended, "clean_accuracy": clean, "undefended_accuracy": undefended,
            "worst_gap": round(max(clean[t] - defended[t] for t in clean), 2), "runs": runs}
