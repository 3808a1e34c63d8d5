"""The operator dashboard at fleet scale: every route's answer size and time with 10,000 devices in the registry.

    python -m benchmarks.dashboard                     # writes benchmarks/results/dashboard.json
    python -m benchmarks.dashboard --devices 2000 --out /tmp/dashboard.json

A registry (SQLite, as a simulation's) with ``--devices`` registered devices of the demo's profile mix, a heartbeat
from each, and ``--rounds`` recorded rounds of 1 % of the fleet with a published version each; the coordinator's
operator listener on loopback in front of it. Each route the dashboard polls is asked ``--repeats`` times with an
operator's credential: its answer's bytes and the median, 95th-percentile and worst time. Issue 28's targets:
every page under 1 MB and answered in under 300 ms at the 95th percentile at 10,000 devices; the metrics endpoint
under 200 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import command, machine, write_json
from contracts.policy import Budget, CalibrationPoint
from contracts.profiles import load_profiles
from coordinator.metrics import FleetMetrics
from coordinator.operator_api import OperatorListener, operator_app
from coordinator.registry import Registry
from runtime.processes import pick_port

RESULTS = Path(__file__).parent / "results"
DENSITIES = (1.0, 0.5, 0.25, 0.1)
POINTS = [CalibrationPoint(d, 40 * d, 200 * d) for d in DENSITIES]
MAX_BYTES, MAX_MS, METRICS_MS = 1_000_000, 300.0, 200.0
POLL_S = 2.0  # the dashboard's poll period (POLL_MS in coordinator/dashboard/app.js)
SCRAPE_S = 15.0  # Prometheus' default scrape interval
MAX_OVERHEAD_PCT = 5.0


def fill(registry: Registry, devices: int, rounds: int, seed: int = 0) -> list[str]:
    """The fleet, its heartbeats and its rounds; the device names."""
    rng = random.Random(seed)
    profiles = list(load_profiles())
    names = [f"dev-{i:05d}" for i in range(devices)]
    ids = {}
    for name, token in registry.enroll(names).items():
        ids[name] = registry.enroll_device(token, name, rng.choice(profiles), POINTS)[0].device_id
    for device_id in ids.values():
        registry.heartbeat(device_id, Budget(rng.uniform(5, 60), rng.uniform(50, 400)))
    for r in range(1, rounds + 1):
        trained = rng.sample(names, max(1, devices // 100))
        participants = {name: rng.choice(DENSITIES) for name in trained}
        registry.record_round(r, {ids[n]: d for n, d in participants.items()},
                              {d: {"accuracy": 70 + r} for d in DENSITIES},
                              10_000, 5_000, model_version=f"round-{r}",
                              details={"participants": participants, "wall_s": 20.0, "refused": {}},
                              published=(f"/m/round-{r}", DENSITIES))
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS / "dashboard.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as state, Registry(state_dir=state) as registry:
        print(f"filling a registry with {args.devices} devices and {args.rounds} rounds", flush=True)
        names = fill(registry, args.devices, args.rounds)
        credential = registry.add_operator("bench")
        port = pick_port()
        listener = OperatorListener(operator_app(registry, FleetMetrics(registry), secure_cookie=False), "127.0.0.1",
                                    port, None).start()
        routes = ["/", "/static/app.js", "/api/summary", "/api/rounds", f"/api/rounds?after={args.rounds}",
                  "/api/devices?offset=0&limit=100",
                  f"/api/devices?offset={max(0, args.devices - 100)}&limit=100",
                  f"/api/devices/{names[len(names) // 2]}",
                  "/metrics"]
        rows = []
        try:
            for route in routes:
                times, size = [], 0
                for _ in range(args.repeats):
                    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}",
                                                     headers={"Authorization": f"Bearer {credential}"})
                    started = time.perf_counter()
                    with urllib.request.urlopen(request, timeout=30) as reply:
                        size = len(reply.read())
                    times.append(1000 * (time.perf_counter() - started))
                p95 = statistics.quantiles(times, n=20, method="inclusive")[-1]
                limit_ms = METRICS_MS if route == "/metrics" else MAX_MS
                rows.append({"route": route, "bytes": size, "median_ms": round(statistics.median(times), 1),
                             "p95_ms": round(p95, 1), "max_ms": round(max(times), 1),
                             "within_target": size < MAX_BYTES and p95 < limit_ms})
                print(rows[-1], flush=True)
        finally:
            listener.stop()
    # What serving them costs the coordinator, as a share of any stretch of a round: one open dashboard asks, every
    # POLL_S, the summary, the rounds after the last it has and its page of the fleet (coordinator/dashboard/app.js);
    # Prometheus scrapes /metrics every SCRAPE_S (its default).
    by_route = {r["route"]: r for r in rows}
    pages = [r for route, r in by_route.items() if route.startswith("/api/devices?")]
    poll_ms = sum(by_route[route]["median_ms"] for route in
                  ("/api/summary", f"/api/rounds?after={args.rounds}", "/api/devices?offset=0&limit=100"))
    overhead = poll_ms / (1000 * POLL_S) + by_route["/metrics"]["median_ms"] / (1000 * SCRAPE_S)
    write_json(args.out, {"command": command(), "machine": machine(), "devices": args.devices,
                          "fleet_page_p95_ms": max(r["p95_ms"] for r in pages),
                          "fleet_page_bytes": max(r["bytes"] for r in pages),
                          "metrics_p95_ms": by_route["/metrics"]["p95_ms"],
                          "overhead_pct": round(100 * overhead, 2),
                          "overhead": f"one open dashboard polling every {POLL_S:g} s ({poll_ms:.1f} ms of serving a "
                                      f"poll) and a Prometheus scrape every {SCRAPE_S:g} s, as a share of one core",
                          "rounds": args.rounds, "repeats": args.repeats,
                          "target": {"bytes": MAX_BYTES, "p95_ms": MAX_MS, "metrics_p95_ms": METRICS_MS,
                                     "overhead_pct": MAX_OVERHEAD_PCT},
                          "routes": rows, "all_within_target": all(r["within_target"] for r in rows)
                          and 100 * overhead < MAX_OVERHEAD_PCT})


if __name__ == "__main__":
    main()
