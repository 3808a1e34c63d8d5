"""A 10,000-device fleet on one machine: `simulate --devices 10000` at 1% per round, on SQLite and PostgreSQL.

    python -m benchmarks.scale                       # both registries; writes benchmarks/results/scale.json
    python -m benchmarks.scale --db sqlite --devices 2000 --rounds 3

Reports wall time, peak memory of the whole process tree, and whether the registry and control plane kept up
with every virtual device's heartbeats: answered per second, p50/p99 latency, lost (failed) heartbeats, the
longest gap between one online device's consecutive heartbeats (kept up: none lost and no gap over the period
by more than ``SLACK``), and the budget rows the registry holds against the heartbeats the fleet saw answered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy import text

from benchmarks.common import command, machine, markdown_table, write_json
from benchmarks.registry_bench import DEFAULT_PG_URL, fresh_database
from contracts.settings import RunSettings
from coordinator.registry.engine import make_engine
from dress_model.checkpoint import atomic_write
from runtime.processes import stop_on_sigterm
from simulations.run import SimulationSettings, run_simulation

RESULTS = Path(__file__).parent / "results"
SLACK = 0.1  # a sweep of the fleet starts every period; where a device falls in it moves a little between sweeps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--heartbeat-s", type=float, default=60.0,
                   help="the fleet's heartbeat period; at 30 s, sweeps of 10,000 devices run back to back on 2 cores "
                        "and the simulated training slows to ~90 s a round")
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/scale-bench"))
    args = p.parse_args()
    stop_on_sigterm()  # a killed benchmark still stops its SuperLink and Ray
    results = []
    for db in args.db.split(","):
        with fresh_database(db, args.pg_url) as url:
            run = RunSettings.defaults(num_rounds=args.rounds, fraction=args.fraction, max_examples=args.max_examples,
                                       eval_examples=1000, heartbeat_s=args.heartbeat_s, db_url=url)
            settings = SimulationSettings(run, devices=args.devices, run_dir=args.run_dir / db)
            print(f"== {db}: {args.devices} devices, {args.rounds} rounds", flush=True)
            metrics = run_simulation(settings, lambda r: print(f"  round {r['round']}: "
                                                               f"{len(r['participants'])} devices", flush=True))
            engine = make_engine(url, pool_size=1, max_overflow=0)
            with engine.connect() as conn:
                stored = conn.execute(text("SELECT count(*) FROM budgets")).scalar_one()
            engine.dispose()
            results.append({"db": db, "devices": args.devices, "rounds": metrics["rounds"],
                            "trained_per_round": [len(r["participants"]) for r in metrics["per_round"]],
                            "wall_s": metrics["wall_s"], "peak_rss_mb": metrics["peak_rss_mb"],
                            # each round's own wall, and everything outside them: start-up (SuperLink, registering
                            # the fleet, Ray and its 10,000 nodes) and Flower's time between rounds
                            "round_wall_s": [round(r["wall_s"], 1) for r in metrics["per_round"]],
                            "outside_rounds_s": round(metrics["wall_s"] - sum(r["wall_s"] for r in metrics["per_round"]), 1),
                            "heartbeats": metrics["heartbeats"], "budget_rows": stored,
                            "kept_up": metrics["heartbeats"]["lost"] == 0
                            and metrics["heartbeats"]["max_gap_s"] <= args.heartbeat_s * (1 + SLACK)})
            print(results[-1], flush=True)
            result = {"command": command(), "machine": machine(), "heartbeat_s": args.heartbeat_s,
                      "fraction": args.fraction, "runs": results}
            write_json(args.out, result)
            atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(summary_markdown(result)))


def summary_markdown(result: dict) -> str:
    rows = [{"registry": r["db"], "devices": r["devices"], "rounds": r["rounds"], "wall s": r["wall_s"],
             "outside rounds s": r.get("outside_rounds_s", "—"), "peak MB": r["peak_rss_mb"],
             "heartbeats": r["heartbeats"]["answered"], "lost": r["heartbeats"]["lost"],
             "per s": r["heartbeats"]["per_s"], "p99 ms": r["heartbeats"]["p99_ms"],
             "max gap s": r["heartbeats"]["max_gap_s"], "kept up": "yes" if r["kept_up"] else "no"}
            for r in result["runs"]]
    return "\n".join([
        "# A 10,000-device fleet on one machine", "", f"`{result['command']}`", "",
        f"{result['fraction']:g} of the fleet trains per round; every online device heartbeats every "
        f"{result['heartbeat_s']:g} s and at each round's end. Kept up: no heartbeat lost and no online device's "
        f"heartbeats more than {1 + SLACK:g}× the period apart.", "",
        markdown_table(rows, list(rows[0])), ""])


if __name__ == "__main__":
    main()
