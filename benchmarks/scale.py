"""A 10,000-device fleet on one machine: `simulate --devices 10000 --fraction 0.01 --rounds 10` with every other
setting at its default, on SQLite and PostgreSQL.

    python -m benchmarks.scale                       # both registries; writes benchmarks/results/scale.json
    python -m benchmarks.scale --db sqlite --devices 2000 --rounds 3

Reports wall time, peak memory of the whole process tree, accuracy, and whether the registry and control plane
kept up with every virtual device's heartbeats: answered per second, p50/p99 latency, lost (failed) heartbeats,
the longest gap between one online device's consecutive heartbeats against the period the coordinator told the
fleet (kept up: none lost and no gap over the period by more than ``SLACK``) and against the offline limit, and
the budget rows the registry holds against the heartbeats the fleet saw answered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy import text

from benchmarks.common import command, machine, markdown_table, write_json
from benchmarks.registry_bench import DEFAULT_PG_URL, fresh_database
from contracts.settings import RunSettings, heartbeat_period_s, stale_after
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
    p.add_argument("--heartbeat-s", type=float, default=None,
                   help="the heartbeat setting (default: the run settings'; the coordinator lengthens the period it "
                        "tells a large fleet, contracts.settings.heartbeat_period_s)")
    p.add_argument("--max-examples", type=int, default=None, help="default: the run settings'")
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/scale-bench"))
    args = p.parse_args()
    stop_on_sigterm()  # a killed benchmark still stops its SuperLink and Ray
    results = []
    for db in args.db.split(","):
        with fresh_database(db, args.pg_url) as url:
            chosen = {k: v for k, v in (("heartbeat_s", args.heartbeat_s), ("max_examples", args.max_examples))
                      if v is not None}
            run = RunSettings.defaults(num_rounds=args.rounds, fraction=args.fraction, db_url=url, **chosen)
            period = heartbeat_period_s(run.heartbeat_s, args.devices)
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
                            "accuracy": {f"{a['density']:g}": a["accuracy"] for a in metrics["accuracy"]},
                            "heartbeat_period_s": period,
                            "offline_limit_s": stale_after(run.heartbeat_s, args.devices).total_seconds(),
                            "heartbeats": metrics["heartbeats"], "budget_rows": stored,
                            "kept_up": metrics["heartbeats"]["lost"] == 0
                            and metrics["heartbeats"]["max_gap_s"] <= period * (1 + SLACK)})
            print(results[-1], flush=True)
            result = {"command": command(), "machine": machine(), "heartbeat_s": run.heartbeat_s,
                      "fraction": args.fraction, "runs": results}
            write_json(args.out, result)
            atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(summary_markdown(result)))


def summary_markdown(result: dict) -> str:
    rows = [{"registry": r["db"], "devices": r["devices"], "rounds": r["rounds"], "wall s": r["wall_s"],
             "outside rounds s": r.get("outside_rounds_s", "—"), "peak MB": r["peak_rss_mb"],
             "heartbeats": r["heartbeats"]["answered"], "lost": r["heartbeats"]["lost"],
             "per s": r["heartbeats"]["per_s"], "p99 ms": r["heartbeats"]["p99_ms"],
             "period s": r.get("heartbeat_period_s", "—"), "max gap s": r["heartbeats"]["max_gap_s"],
             "offline after s": r.get("offline_limit_s", "—"), "kept up": "yes" if r["kept_up"] else "no",
             "accuracy d=1 %": r.get("accuracy", {}).get("1", "—")}
            for r in result["runs"]]
    return "\n".join([
        "# A 10,000-device fleet on one machine", "", f"`{result['command']}`", "",
        f"{result['fraction']:g} of the fleet trains per round; every other setting is the default. The heartbeat "
        f"setting is {result['heartbeat_s']:g} s; the coordinator tells a fleet this size a longer period (devices / "
        "200 a second), and a device silent for six periods is offline. Kept up: no heartbeat lost and no online "
        f"device's heartbeats more than {1 + SLACK:g}× the period apart. Accuracy: the last round's model on the "
        "whole test split.", "",
        markdown_table(rows, list(rows[0])), ""])


if __name__ == "__main__":
    main()
