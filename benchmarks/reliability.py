"""What strangers, crashes and poisoned devices can do to the fleet: fuzzed and crafted packed files, fuzzed
control-plane requests, strangers at every listener (the public SuperLink address from another host too),
poisoned replies in the real aggregation path in rounds of 1, 2 and 3+ replies, kill -9 during rounds.
Seeded, bounded in count and time, loopback or network namespaces made here only.

    python -m benchmarks.reliability                  # writes benchmarks/results/reliability.{json,md}
    python -m benchmarks.reliability --packed 100 --crafted 20 --grpc 100 --poisoned 20 --poisoned-by-replies 10 \
        --superlink 20 --faults 0 --byzantine 0       # a short form

A *crash* is anything but the clear refusal each layer promises — ``PackedFormatError`` from the packed loader;
a gRPC status other than UNKNOWN/INTERNAL from the control plane (an unhandled exception in a handler); a reply
check (``RejectedUpdate``) in the aggregation — or taking longer than ``HANG_S``. *Strangers* call the control
plane without a credential, with forged, spent or expired secrets, or under another device's name (each must be refused,
UNAUTHENTICATED or PERMISSION_DENIED, and change nothing); call an agent's Predict on mutual TLS without the
fleet's client certificate; connect SuperNodes whose keys nobody registered; or ask the coordinator's operator
listener (dashboard, JSON API, metrics) without an operator's credential. *Faults* (benchmarks/faults.py)
kill agents and the coordinator at random during rounds. *Byzantine* devices (benchmarks/byzantine.py) reply the
reverse of their honest update in a simulated fleet; robust aggregation must keep accuracy near the clean run's.

This module only runs the probes and writes the results. The probes: fuzzed and crafted packed files
(benchmarks/packed_fuzz.py, where ``HANG_S`` is), fuzzed control-plane requests and strangers at every listener
(benchmarks/strangers.py; the public SuperLink address from another host: benchmarks/superlink_strangers.py),
poisoned replies (benchmarks/poisoned.py), faults and Byzantine devices (above).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.byzantine import RUNS as BYZANTINE_RUNS
from benchmarks.byzantine import run_byzantine
from benchmarks.common import command, machine, markdown_table, write_json
from benchmarks.faults import run_faults
from benchmarks.packed_fuzz import fuzz_packed, packed_crafted
from benchmarks.poisoned import REPLY_COUNTS, poisoned, poisoned_by_replies
from benchmarks.strangers import PREDICT_STRANGERS, STRANGERS, fuzz_grpc, strangers
from benchmarks.superlink_strangers import superlink_strangers
from dress_model.checkpoint import atomic_write

RESULTS = Path(__file__).parent / "results"


def report(result: dict[str, Any]) -> str:
    """reliability.md: a row per probe measured, then what the refusals were and the Byzantine runs."""
    rows = []
    if "poisoned" in result:
        rows.append({"probe": "poisoned replies", "tried": result["poisoned"]["tried"],
                     "aggregated": result["poisoned"]["aggregated"], "crashes": result["poisoned"]["crashes"]})
    if "poisoned_by_replies" in result:
        rows += [{"probe": f"poisoned replies, one a round of {size} ({REPLY_COUNTS[size]} honest)",
                  "tried": part["tried"], "aggregated": part["aggregated"], "crashes": part["crashes"]}
                 for size, part in result["poisoned_by_replies"].items() if size in REPLY_COUNTS]
    if "fuzz" in result:
        rows += [{"probe": "fuzzed packed files", "tried": result["fuzz"]["packed"]["tried"], "aggregated": "—",
                  "crashes": result["fuzz"]["packed"]["crashes"]},
                 {"probe": "fuzzed control-plane requests", "tried": result["fuzz"]["grpc"]["tried"],
                  "aggregated": "—", "crashes": result["fuzz"]["grpc"]["crashes"]}]
    if "packed_crafted" in result:
        c = result["packed_crafted"]
        rows.append({"probe": f"crafted packed files: consistent headers declaring huge models (slowest "
                              f"{c['max_s']:.3f} s, at most {c['max_extra_mb']:.1f} MB resident)",
                     "tried": c["tried"], "aggregated": "—", "crashes": c["tried"] - c["refused"]})
    if "strangers" in result:
        rows += [{"probe": f"strangers: {where}", "tried": part["tried"], "aggregated": "—",
                  "crashes": part["tried"] - part["refused"]} for where, part in result["strangers"]["where"].items()]
    if "superlink" in result and "skipped" not in result["superlink"]:
        s = result["superlink"]
        rows.append({"probe": "strangers at the public SuperLink address, another host (flwr CLI, every route, fuzz)",
                     "tried": s["tried"], "aggregated": "—",
                     "crashes": f"{s['tried'] - s['refused']}; coordinator alive: {s['coordinator_alive']}"})
    if "faults" in result:
        f = result["faults"]
        rows.append({"probe": f"kill -9 during rounds ({f['agents']} agents, coordinator; {f['rounds']} rounds)",
                     "tried": f["kills"], "aggregated": "—", "crashes": f"run completed: {bool(f['runs_completed'])}, "
                     f"lost {f['lost']}, orphans {f['orphans']}, mid-round kills {f.get('kills_mid_round', '—')}, "
                     f"restart tracebacks {f.get('restart_tracebacks', '—')}"})
    text = (f"# Reliability: strangers' bytes and poisoned devices\n\n`{result['command']}`\n\n"
            + markdown_table(rows, ["probe", "tried", "aggregated", "crashes"])
            + "\nFor strangers, *crashes* counts those not refused.")
    if "fuzz" in result:
        text += (" Control-plane answers to the fuzzed requests (half of them carrying a real device's credential): "
                 f"{result['fuzz']['grpc']['codes']}.")
    if "strangers" in result:
        where = result["strangers"]["where"]
        text += (f" To the strangers ({', '.join(STRANGERS)}): {where['control-plane']['codes']}. Predict on mutual "
                 f"TLS ({', '.join(PREDICT_STRANGERS)}): {where['predict']['codes']}. SuperLink with SuperNode "
                 "authentication: SuperNodes with an unregistered key and with none.")
        if "dashboard" in where:
            o = where["dashboard"]
            text += (f" The operator listener ({', '.join(o['kinds'])}; on {', '.join(f'{m} {r}' for m, r in o['routes'])}"
                     f"; open to anyone: {', '.join(o['public'])}, the sign-in page): HTTP {o['codes']}; its "
                     f"operator still answered: {o['still_serving']}.")
    if "poisoned_by_replies" in result:
        by = result["poisoned_by_replies"]
        text += (" Beside the poisoned replies, honest ones aggregated: "
                 + ", ".join(f"{by[size]['honest_aggregated']} of {by[size]['honest_tried']} (rounds of {size})"
                             for size in REPLY_COUNTS)
                 + f"; rounds rolled back: {sum(by[size]['rolled_back'] for size in REPLY_COUNTS)}; every round's "
                 f"model finite, with BN statistics in range: {by['model_plausible']}.")
    text += "\n"
    if "byzantine" in result:
        b = result["byzantine"]
        tiers = list(b["clean_accuracy"])
        named = (("clean, mean", b["clean_accuracy"]), (f"clean, {b['aggregation']}", b.get("clean_robust_accuracy")),
                 (f"{b['liars']} liars, mean (no defence)", b["undefended_accuracy"]),
                 (f"{b['liars']} liars, {b['aggregation']}", b["accuracy"]))
        runs = [{"run": run, **{f"d={t}": accuracy[t] for t in tiers}} for run, accuracy in named if accuracy]
        gap = "—" if b["worst_gap"] is None else f"{b['worst_gap']:.2f} pt"
        text += (f"\n## Byzantine devices\n\n{b['liars']} of {b['devices']} devices ({b['fraction']:.0%}) reply "
                 f"{b['attack']} of their honest update; {b['partition']}, {b['rounds']} rounds, accuracy per tier = "
                 f"mean of the last {b['last']} rounds, mean over seeds {', '.join(map(str, b['seeds']))}. Worst "
                 f"tier's gap between the clean run (mean) and the attacked one with {b['aggregation']}: {gap}.\n\n"
                 + markdown_table(runs, ["run", *(f"d={t}" for t in tiers)]))
    return text


PARTS = ("poisoned", "poisoned_by_replies", "strangers", "superlink", "faults", "fuzz", "packed_crafted", "byzantine")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packed", type=int, default=1000, help="fuzzed packed files")
    p.add_argument("--crafted", type=int, default=200, help="crafted packed files (consistent header, huge model)")
    p.add_argument("--grpc", type=int, default=1000, help="fuzzed control-plane requests")
    p.add_argument("--poisoned", type=int, default=60, help="poisoned replies")
    p.add_argument("--poisoned-by-replies", type=int, default=60,
                   help="poisoned replies in rounds of each size (1, 2, 3+ replies), one a round")
    p.add_argument("--strangers", type=int, default=210, help="strangers' calls to the control plane and Predict")
    p.add_argument("--superlink", type=int, default=200, help="fuzzed Fleet API requests among the strangers' probes "
                   "of a TLS coordinator's public SuperLink address from another host (benchmarks/superlink_strangers.py)")
    p.add_argument("--faults", type=int, default=20, help="kill -9 of agents and the coordinator during rounds "
                   "(benchmarks/faults.py); 0 = skip")
    p.add_argument("--byzantine", type=int, default=30, help="rounds of each run with and without Byzantine devices "
                   "(benchmarks/byzantine.py: 100 devices, each of --byzantine-runs per seed); 0 = skip")
    p.add_argument("--byzantine-seeds", default="0,1")
    p.add_argument("--byzantine-runs", default=",".join(BYZANTINE_RUNS),
                   help="which runs per seed (benchmarks/byzantine.py RUNS); the others are kept from --out")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to measure, from {', '.join(PARTS)}; the others are kept from --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = p.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(only) - set(PARTS)):
        raise SystemExit(f"--only: unknown part(s) {unknown}; expected some of {', '.join(PARTS)}")
    byzantine_runs = tuple(r.strip() for r in args.byzantine_runs.split(",") if r.strip())
    if unknown := sorted(set(byzantine_runs) - set(BYZANTINE_RUNS)):
        raise SystemExit(f"--byzantine-runs: unknown run(s) {unknown}; expected some of {', '.join(BYZANTINE_RUNS)}")
    try:
        byzantine_seeds = tuple(int(s) for s in args.byzantine_seeds.split(","))
    except ValueError:
        raise SystemExit(f"--byzantine-seeds: comma-separated integers expected, got {args.byzantine_seeds!r}") from None
    kept = json.loads(args.out.read_text()) if set(only) != set(PARTS) and args.out.is_file() else {}
    measure: dict[str, Callable[[], Any]] = {
        "poisoned": lambda: poisoned(args.poisoned, args.seed),
        "poisoned_by_replies": lambda: poisoned_by_replies(args.poisoned_by_replies, args.seed),
        "strangers": lambda: strangers(args.strangers, args.seed),
        "superlink": lambda: superlink_strangers(args.superlink, args.seed),
        "faults": lambda: run_faults(args.faults, seed=args.seed) if args.faults else None,
        "fuzz": lambda: {"packed": fuzz_packed(args.packed, args.seed), "grpc": fuzz_grpc(args.grpc, args.seed)},
        "packed_crafted": lambda: packed_crafted(args.crafted, args.seed),
        "byzantine": lambda: run_byzantine(seeds=byzantine_seeds, rounds=args.byzantine, runs=byzantine_runs,
                                           kept=kept.get("byzantine", {}).get("runs")) if args.byzantine else None,
    }
    result = {"command": " && ".join(dict.fromkeys([*filter(None, kept.get("command", "").split(" && ")), command()])),
              "machine": machine(), "seed": args.seed, **{k: kept[k] for k in PARTS if k in kept and k not in only}}
    for part in only:  # written after every part: a part that fails an hour in keeps the others' results
        if (value := measure[part]()) is not None:
            result[part] = value
            write_json(args.out, result)
            atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(report(result)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
