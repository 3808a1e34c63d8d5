"""The 100-device fleet demo as a benchmark: wall time, peak memory, framework overhead, bytes, accuracy.

    python -m benchmarks.fleet            # the `make demo` settings; writes benchmarks/results/fleet.json
    python -m benchmarks.fleet --busy 2 --compare-to benchmarks/results/fleet.json --out benchmarks/results/fleet-busy.json

`--busy N` runs N processes that spin on a core each for the whole run, as a busy machine would; `--compare-to`
sets this run's device-rounds per density beside another run's (issue 27: the same command builds the same fleet
on a busy or an idle machine, ±10 % device-rounds per tier).

Overhead is the share of round time spent neither training on devices nor doing DRESS work on the server:
1 - (device compute / concurrent devices + server compute) / round wall time, summed over rounds. Devices run
on Ray actors, one CPU each, so at most `cores` of them train at once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import command, machine, write_json
from contracts.settings import RunSettings
from dress_model.models import create_model
from runtime.processes import stop_on_sigterm
from simulations.run import SimulationSettings, run_simulation

RESULTS = Path(__file__).parent / "results"


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """``processes`` children spinning on a core each while the block runs; daemonic, so they die with us."""
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(processes)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()


def device_rounds_per_density(profiles: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """The fleet's device-rounds per density (its tiers), summed over profiles."""
    total: Counter[str] = Counter()
    for counts in profiles.values():
        total.update(counts)
    return dict(sorted(total.items(), key=lambda item: -float(item[0])))


def compare(ours: Mapping[str, int], theirs: Mapping[str, int]) -> dict:
    """Per density: both counts and the relative difference to ``theirs``; the largest one."""
    rows = [{"density": d, "this_run": ours.get(d, 0), "other_run": theirs.get(d, 0),
             "rel_diff": round(abs(ours.get(d, 0) - theirs.get(d, 0)) / max(1, theirs.get(d, 0)), 3)}
            for d in sorted(set(ours) | set(theirs), key=lambda d: -float(d))]
    return {"per_density": rows, "max_rel_diff": max((r["rel_diff"] for r in rows), default=0.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--max-examples", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/fleet-bench"))
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core each during the run")
    p.add_argument("--compare-to", type=Path, help="another run's JSON: compare device-rounds per density with it")
    args = p.parse_args()
    other = json.loads(args.compare_to.read_text()) if args.compare_to else None
    stop_on_sigterm()  # a killed benchmark still stops its SuperLink and Ray

    run = RunSettings.defaults(num_rounds=args.rounds, fraction=args.fraction, max_examples=args.max_examples)
    settings = SimulationSettings(run, devices=args.devices, run_dir=args.run_dir)
    with busy(args.busy):
        metrics = run_simulation(settings, lambda r: print(f"round {r['round']}: {r['accuracy']}", flush=True))
        load = os.getloadavg()
    rounds = metrics["per_round"]
    concurrency = max(1, min(os.cpu_count() or 1, round(settings.devices * run.fraction)))
    useful = sum(r["device_compute_s"] / concurrency + r["server_s"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    dense = 4 * create_model(run.architecture()).subnet_params(1.0)
    result = {
        "machine": machine(),
        "command": command(),
        "devices": settings.devices,
        "rounds": run.num_rounds,
        "wall_s": metrics["wall_s"],
        "peak_rss_mb": metrics["peak_rss_mb"],
        "overhead_fraction": round(max(0.0, 1 - useful / wall), 3) if wall else None,
        "round_wall_s": round(wall, 1),
        "device_compute_s": round(sum(r["device_compute_s"] for r in rounds), 1),
        "server_s": round(sum(r["server_s"] for r in rounds), 1),
        "bytes": [{**row, "dense": dense, "down_vs_dense": round(row["down"] / dense, 3)} for row in metrics["bytes"]],
        "accuracy": metrics["accuracy"],
        "profiles": metrics["profiles"],
        "heartbeats": metrics["heartbeats"],
        "busy_processes": args.busy,
        "load_average_1_5_15": [round(x, 2) for x in load],
        "calibration_source": settings.calibration_source,
        "device_rounds_per_density": device_rounds_per_density(metrics["profiles"]),
    }
    if other is not None:
        result["compared_to"] = {"file": str(args.compare_to), "busy_processes": other.get("busy_processes", 0),
                                 **compare(result["device_rounds_per_density"],
                                           other.get("device_rounds_per_density")
                                           or device_rounds_per_density(other["profiles"]))}
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
