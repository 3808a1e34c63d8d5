"""Round time and participation against packet loss: a TLS fleet across hosts whose device links are bad.

For each loss rate a fresh set of hosts (Linux network namespaces on one bridge, ``benchmarks/netns.py``): a
coordinator and ``--devices`` agents, each on a host of its own, every device link delayed ``--delay-ms`` ±
``--jitter-ms`` each way and losing ``--loss`` percent of its packets each way (netem, or its user-space stand-in
``benchmarks/netem_queue.py`` where the kernel has no netem; the JSON says which). The fleet enrolls, joins over
those links and trains ``--rounds`` rounds with every device drawn each round and a round timeout of
``--round-timeout`` s: a device whose update has not arrived by then misses the round.

    python -m benchmarks.bad_network                    # loss 0, 5, 20 %: about 10 min on 2 busy cores
    python -m benchmarks.bad_network --quick            # loss 0 and 20 %, 2 rounds each
    python -m benchmarks.bad_network --loss 0,10 --rounds 5 --out /tmp/bad.json

Per loss rate: seconds until round 1 is recorded (start, enrollment, joining and one round, all over the bad
links), each round's wall time and the part of it spent waiting for the devices (wall less the server's own
aggregation and evaluation), who trained each round, and what the agents and SuperNodes said while retrying:
heartbeat failures (logged once per kind of failure until heartbeats work again) and Flower's reconnection
tries. Needs root and iproute2 (and iptables where the kernel has no netem); small settings throughout (cnn
width 4, 32 examples per device per round), so it measures the network's share, not training.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import command, machine, markdown_table, write_json
from benchmarks.fleet_processes import BIN, enroll_all, recorded_rounds, spawn, stop_all
from benchmarks.netns import Network, hosts, impairment_unavailable
from dress_model.checkpoint import atomic_write
from runtime.certificates import init_certificates
from runtime.processes import stop_on_sigterm

RESULTS = Path(__file__).parent / "results"
PROFILES = ["pi4", "jetson-nano", "phone", "pi5", "laptop-x86"]  # the devices' profiles, in turn
SUPERLINK_PORT, CONTROL_PORT = 9092, 9093
HEARTBEAT_S, AGENT_HEARTBEAT_S = 1.0, 0.5
FLEET = ["--width", "4", "--densities", "1,0.25", "--server-average", "0", "--max-examples", "32",
         "--eval-examples", "200"]  # small: the network's share of a round, not training's
JOIN_TIMEOUT_S = 300.0  # for round 1: start, calibration, enrollment and joining, over the bad links


def run_level(loss: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One loss rate: a fresh fleet on fresh hosts, ``args.rounds`` rounds; what it took."""
    devices = [f"device-{i + 1}" for i in range(args.devices)]
    with hosts("coordinator", *devices) as net:
        for name in devices:
            net.impair(name, args.delay_ms, args.jitter_ms, loss)
        return fleet_run(net, devices, loss, args, work)


def fleet_run(net: Network, devices: list[str], loss: float, args: argparse.Namespace, work: Path,
              during: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """The fleet on ``net``'s hosts for ``args.rounds`` rounds; ``during(state_dir)`` runs every half second
    while it trains (what a benchmark does to the network meanwhile). ``args.heartbeat_s`` and
    ``args.agent_heartbeat_s`` None: the commands' defaults."""
    host = net.address("coordinator")
    control, superlink = f"{host}:{CONTROL_PORT}", f"{host}:{SUPERLINK_PORT}"
    certs = init_certificates(work / "certs", [host]).directory
    state = work / "coordinator"
    tokens = enroll_all(state, devices)
    logs = {name: work / f"{name}.log" for name in ("coordinator", *devices)}
    start = time.monotonic()
    processes = [spawn(net.command("coordinator", [
        str(BIN / "dress-fleet"), "coordinator", "start", "--host", host, "--superlink-port", str(SUPERLINK_PORT),
        "--control-port", str(CONTROL_PORT), "--certs", str(certs), "--state-dir", str(state),
        "--rounds", str(args.rounds), "--min-devices", str(len(devices)), "--fraction", "1", *FLEET,
        *_option("--heartbeat-s", args.heartbeat_s), "--round-timeout", str(args.round_timeout)]),
        logs["coordinator"])]
    outcome = "completed"
    first_round_s = None
    try:
        for i, name in enumerate(devices):
            trace = work / f"{name}.csv"
            trace.write_text("t_s,latency_ms,memory_mb\n0,1000,100\n")  # every density fits
            processes.append(spawn(net.command(name, [
                str(BIN / "dress-agent"), "join", "--device", PROFILES[i % len(PROFILES)], "--token", tokens[name],
                "--coordinator", control, "--superlink", superlink, "--ca", str(certs / "ca.pem"),
                "--partition-id", str(i), "--num-partitions", str(len(devices)), "--budget-trace", str(trace),
                *_option("--heartbeat-interval", args.agent_heartbeat_s), "--connect-timeout", str(JOIN_TIMEOUT_S),
                "--calibration-repeats", "5", "--training-calibration-steps", "1",
                "--state-dir", str(work / name)]), logs[name]))  # fmt: skip
        deadline = start + JOIN_TIMEOUT_S + args.rounds * (args.round_timeout + 120)
        while (done := len(recorded_rounds(state))) < args.rounds:
            if done and first_round_s is None:
                first_round_s = time.monotonic() - start
            if exited := [n for n, p in zip(logs, processes, strict=True) if p.poll() is not None]:
                outcome = f"exited: {', '.join(exited)}"
                break
            if time.monotonic() > (start + JOIN_TIMEOUT_S if not done else deadline):
                outcome = f"timed out after {done} rounds"
                break
            if during is not None:
                during(state)
            time.sleep(0.5)
        wall_s = time.monotonic() - start
    finally:
        stop_all(processes)
    rounds = recorded_rounds(state)
    if first_round_s is None and rounds:
        first_round_s = wall_s
    per_round = [{"round": r.round, "participants": sorted(r.details["participants"]),
                  "wall_s": round(r.details["wall_s"], 1),
                  "waiting_s": round(r.details["wall_s"] - r.details["server_s"], 1),
                  "published": r.model_version is not None} for r in rounds]
    said = {name: log.read_text(errors="replace") for name, log in logs.items()}
    supernodes = [(work / name / "logs" / f"supernode-{name}.log") for name in devices]
    return {
        "loss_pct": loss, "delay_ms": args.delay_ms, "jitter_ms": args.jitter_ms, "backend": net.impairment_backend(),
        "outcome": outcome, "wall_s": round(wall_s, 1),
        "first_round_s": round(first_round_s, 1) if first_round_s is not None else None,
        "rounds": per_round,
        "participation": round(statistics.mean(len(r["participants"]) / len(devices) for r in per_round), 3)
        if per_round else 0.0,
        "full_rounds": sum(len(r["participants"]) == len(devices) for r in per_round),
        "heartbeat_failures_logged": sum(said[name].count("heartbeat failed") for name in devices),
        "supernode_retries": sum(p.read_text(errors="replace").count("Connection attempt failed")
                                 for p in supernodes if p.exists()),
    }


def _option(name: str, value: float | None) -> list[str]:
    return [] if value is None else [name, f"{value:g}"]


def summary_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = []
    for level in result["levels"]:
        walls = [r["wall_s"] for r in level["rounds"]]
        waits = [r["waiting_s"] for r in level["rounds"]]
        rows.append({
            "loss %": f"{level['loss_pct']:g}", "rounds": f"{len(level['rounds'])} of {s['rounds']}",
            "round 1 at s": level["first_round_s"] if level["first_round_s"] is not None else "—",
            "round s (median)": statistics.median(walls) if walls else "—",
            "round s (max)": max(walls) if walls else "—",
            "waiting for devices s (median)": statistics.median(waits) if waits else "—",
            "participation": f"{100 * level['participation']:.0f} %",
            "rounds with every device": level["full_rounds"],
            "heartbeat failures logged": level["heartbeat_failures_logged"],
            "SuperNode retries": level["supernode_retries"], "outcome": level["outcome"]})
    backends = sorted({level["backend"] for level in result["levels"]})
    return "\n".join([
        "# Round time and participation against packet loss", "", f"`{result['command']}`", "",
        f"A TLS fleet of {s['devices']} devices and a coordinator, each on a host of its own (network namespaces on "
        f"one bridge). Every device link: {s['delay_ms']:g} ± {s['jitter_ms']:g} ms delay and the loss below, each "
        f"way ({' / '.join(backends)}; a round trip is about twice the delay). Every device is drawn each round; the "
        f"round timeout is {s['round_timeout']:g} s. Round 1 at: seconds from the coordinator's start to round 1 "
        "recorded (joining over the bad links included). Waiting for devices: a round's wall time less the "
        "server's own aggregation and evaluation. Heartbeat failures are logged once per kind until heartbeats "
        "work again; SuperNode retries are Flower's reconnection tries. "
        f"Whole report: {result['wall_s']:.0f} s on {result['machine']['cores']} cores.", "",
        markdown_table(rows, list(rows[0])), ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", default=None, help="comma-separated loss rates in percent (default 0,5,20; --quick 0,20)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="each way, on every device link")
    p.add_argument("--jitter-ms", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=None, help="per loss rate (default 3; --quick 2)")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--round-timeout", type=float, default=40.0,
                   help="seconds a round waits for the devices' updates (on 2 busy cores a device answers in ~25 s)")
    p.add_argument("--quick", action="store_true", help="loss 0 and 20 %%, 2 rounds each (about 5 min)")
    p.add_argument("--out", type=Path, default=RESULTS / "bad-network.json")
    args = p.parse_args()
    args.heartbeat_s, args.agent_heartbeat_s = HEARTBEAT_S, AGENT_HEARTBEAT_S
    args.loss = args.loss or ("0,20" if args.quick else "0,5,20")
    args.rounds = args.rounds or (2 if args.quick else 3)
    if reason := impairment_unavailable():
        raise SystemExit(f"cannot make impaired hosts here: {reason}")
    stop_on_sigterm()  # a killed benchmark still stops its fleet (and the hosts go with the context)
    losses = [float(x) for x in args.loss.split(",")]
    started = time.monotonic()
    levels = []
    for loss in losses:
        print(f"== loss {loss:g} %: {args.devices} devices, {args.rounds} rounds", flush=True)
        with tempfile.TemporaryDirectory(prefix="bad-network-") as work:
            level = run_level(loss, args, Path(work))
        levels.append(level)
        print(f"   {level['outcome']}: round 1 at {level['first_round_s']} s, rounds "
              f"{[(r['round'], len(r['participants']), r['wall_s']) for r in level['rounds']]}", flush=True)
    result = {"command": command(), "machine": machine(), "wall_s": round(time.monotonic() - started, 1),
              "settings": {"devices": args.devices, "rounds": args.rounds, "delay_ms": args.delay_ms,
                           "jitter_ms": args.jitter_ms, "round_timeout": args.round_timeout,
                           "fleet": FLEET, "heartbeat_s": HEARTBEAT_S, "agent_heartbeat_s": AGENT_HEARTBEAT_S},
              "levels": levels}
    write_json(args.out, result)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(summary_markdown(result)))
    print(summary_markdown(result))


if __name__ == "__main__":
    main()
