"""The 100-device fleet demo as a benchmark: wall time, peak memory, framework overhead, bytes, accuracy.

    python -m benchmarks.fleet            # the `make demo` settings; writes benchmarks/results/fleet.json

Overhead is the share of round time spent neither training on devices nor doing DRESS work on the server:
1 - (device compute / concurrent devices + server compute) / round wall time, summed over rounds. Devices run
on Ray actors, one CPU each, so at most `cores` of them train at once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.common import command, machine, write_json
from contracts.settings import RunSettings
from dress_model.models import create_model
from runtime.processes import stop_on_sigterm
from simulations.run import SimulationSettings, run_simulation

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--max-examples", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/fleet-bench"))
    args = p.parse_args()
    stop_on_sigterm()  # a killed benchmark still stops its SuperLink and Ray

    run = RunSettings.defaults(num_rounds=args.rounds, fraction=args.fraction, max_examples=args.max_examples)
    settings = SimulationSettings(run, devices=args.devices, run_dir=args.run_dir)
    metrics = run_simulation(settings, lambda r: print(f"round {r['round']}: {r['accuracy']}", flush=True))
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
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
