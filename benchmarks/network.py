"""Issue 27's bad-network targets: device-rounds on impaired links against clean ones, and a link down mid-round.

The fleet of ``benchmarks/bad_network.py`` (a TLS coordinator and ``--devices`` agents, each on a host of its own,
every device drawn every round), with the commands' default heartbeat settings:

* **netem**: the same run on clean links and with every device link delayed ``--delay-ms`` ± ``--jitter-ms`` and
  losing ``--loss`` % of its packets each way. Device-rounds completed (a device's update counted in a recorded
  round) on the impaired links against the clean ones.
* **link down**: on clean links, one device's link goes down at the switch ``--down-s`` seconds, starting
  ``CUT_INTO_ROUND_S`` into round 2. The run must complete with nothing lost, and the device be heard from again
  (a heartbeat in the registry) within 2 of the heartbeat periods the coordinator asks for once its link is up.

Nothing lost: every round recorded once, each published as a model version, every device's registry row there.

    python -m benchmarks.network                       # writes benchmarks/results/network.{json,md}
    python -m benchmarks.network --rounds 3 --out /tmp/network.json

Needs root and iproute2 (and iptables where the kernel has no netem); about 25 min on 2 idle cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.bad_network import fleet_run
from benchmarks.common import command, machine, markdown_table, write_json
from benchmarks.fleet_processes import recorded_rounds
from benchmarks.netns import hosts, impairment_unavailable
from contracts.settings import RunSettings, heartbeat_period_s
from coordinator.registry import Registry
from dress_model.checkpoint import atomic_write
from runtime.processes import stop_on_sigterm

RESULTS = Path(__file__).parent / "results"
CUT = "device-1"
CUT_INTO_ROUND_S = 5.0  # after round 1 is recorded: round 2 is under way, its devices training


def lost(state: Path, devices: list[str], rounds: int) -> int:
    """Rounds not recorded (or recorded twice), recorded rounds without a published version, and devices without
    their registry row."""
    with Registry(state_dir=state) as registry:
        recorded = [r.round for r in registry.list_rounds()]
        versions = [r.model_version for r in registry.list_rounds()]
        names = {d.name for d in registry.list_devices()}
    return (abs(rounds - len(set(recorded))) + (len(recorded) - len(set(recorded)))
            + sum(v is None for v in versions) + len(set(devices) - names))


def device_rounds(result: dict[str, Any]) -> int:
    return sum(len(r["participants"]) for r in result["rounds"])


def netem_level(args: argparse.Namespace, loss: float, delay_ms: float, jitter_ms: float) -> dict[str, Any]:
    devices = [f"device-{i + 1}" for i in range(args.devices)]
    run = argparse.Namespace(**{**vars(args), "delay_ms": delay_ms, "jitter_ms": jitter_ms})
    with tempfile.TemporaryDirectory(prefix="network-") as work, hosts("coordinator", *devices) as net:
        for name in devices:
            net.impair(name, delay_ms, jitter_ms, loss)
        result = fleet_run(net, devices, loss, run, Path(work))
        result["lost"] = lost(Path(work) / "coordinator", devices, args.rounds)
    return result


class LinkCut:
    """The ``during`` hook of a link-down run: cut ``CUT``'s link into round 2, restore it after ``down_s``, then
    time until the coordinator hears from the device again."""

    def __init__(self, net: Any, down_s: float) -> None:
        self.net, self.down_s = net, down_s
        self.round_1_at: float | None = None
        self.cut_at: float | None = None
        self.up_at: float | None = None
        self.up_wall: datetime | None = None
        self.back_s: float | None = None

    def __call__(self, state: Path) -> None:
        now = time.monotonic()
        if self.round_1_at is None:
            if recorded_rounds(state):
                self.round_1_at = now
        elif self.cut_at is None:
            if now - self.round_1_at >= CUT_INTO_ROUND_S:
                self.net.link(CUT, up=False)
                self.cut_at = now
        elif self.up_at is None:
            if now - self.cut_at >= self.down_s:
                self.net.link(CUT, up=True)
                self.up_at, self.up_wall = now, datetime.now(UTC)
        elif self.back_s is None:
            with Registry(state_dir=state) as registry:
                device = next(d for d in registry.list_devices() if d.name == CUT)
            if device.last_seen > self.up_wall:  # type: ignore[operator]
                self.back_s = now - self.up_at


def link_down(args: argparse.Namespace) -> dict[str, Any]:
    devices = [f"device-{i + 1}" for i in range(args.devices)]
    run = argparse.Namespace(**{**vars(args), "delay_ms": 0.0, "jitter_ms": 0.0})
    with tempfile.TemporaryDirectory(prefix="network-") as work, hosts("coordinator", *devices) as net:
        cut = LinkCut(net, args.down_s)
        result = fleet_run(net, devices, 0.0, run, Path(work), during=cut)
        result["lost"] = lost(Path(work) / "coordinator", devices, args.rounds)
    period = heartbeat_period_s(RunSettings.defaults().heartbeat_s, args.devices)
    later = [r["round"] for r in result["rounds"] if CUT in r["participants"] and cut.up_at is not None
             and r["round"] > 2]
    return {
        "down_s": args.down_s, "run_completed": result["outcome"] == "completed" and cut.up_at is not None,
        "lost": result["lost"], "heartbeat_period_s": period,
        "back_after_s": None if cut.back_s is None else round(cut.back_s, 1),
        "back_after_heartbeats": None if cut.back_s is None else round(cut.back_s / period, 2),
        "trained_again_in_rounds": later, "run": result,
    }


def summary_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    netem = [{"links": f"{r['loss']:g} % loss, {r['delay_ms']:g} ± {r['jitter_ms']:g} ms",
              "device-rounds on clean links": r["device_rounds_clean"],
              "device-rounds completed": r["device_rounds_completed"],
              "completed / clean": f"{100 * r['device_rounds_completed'] / max(1, r['device_rounds_clean']):.1f} %",
              "lost": r["lost"]} for r in result["netem"]]
    down = [{"down s": r["down_s"], "run completed": r["run_completed"], "lost": r["lost"],
             "back after s": r["back_after_s"], "heartbeat period s": r["heartbeat_period_s"],
             "back after heartbeats": r["back_after_heartbeats"],
             f"{CUT} trained again in rounds": ", ".join(map(str, r["trained_again_in_rounds"])) or "—"}
            for r in result["link_down"]]
    return "\n".join([
        "# A fleet across hosts on bad links", "", f"`{result['command']}`", "",
        f"A TLS fleet of {s['devices']} devices and a coordinator, each on a host of its own (network namespaces on "
        f"one bridge; links impaired by {result['backend']}), {s['rounds']} rounds a run, every device drawn every "
        f"round, round timeout {s['round_timeout']:g} s, the commands' default heartbeat settings. "
        "Nothing lost counts rounds not recorded once, rounds without a published version and devices without "
        f"their registry row. Whole report: {result['wall_s']:.0f} s on {result['machine']['cores']} cores.", "",
        "## Impaired links against clean ones", "", markdown_table(netem, list(netem[0])), "",
        f"## A device's link down at the switch, {CUT_INTO_ROUND_S:g} s into round 2", "",
        markdown_table(down, list(down[0])), ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6, help="per run")
    p.add_argument("--loss", type=float, default=5.0, help="percent, each way, on every device link")
    p.add_argument("--delay-ms", type=float, default=100.0, help="each way")
    p.add_argument("--jitter-ms", type=float, default=50.0)
    p.add_argument("--down-s", type=float, default=30.0, help="how long the link is down")
    p.add_argument("--round-timeout", type=float, default=120.0,
                   help="seconds a round waits for updates: long enough that only the network makes a device miss")
    p.add_argument("--out", type=Path, default=RESULTS / "network.json")
    args = p.parse_args()
    args.heartbeat_s = args.agent_heartbeat_s = None  # the commands' defaults
    if reason := impairment_unavailable():
        raise SystemExit(f"cannot make impaired hosts here: {reason}")
    stop_on_sigterm()  # a killed benchmark still stops its fleet (and the hosts go with the context)
    started = time.monotonic()
    print(f"== clean links: {args.devices} devices, {args.rounds} rounds", flush=True)
    clean = netem_level(args, 0.0, 0.0, 0.0)
    print(f"== {args.loss:g} % loss, {args.delay_ms:g} ± {args.jitter_ms:g} ms", flush=True)
    bad = netem_level(args, args.loss, args.delay_ms, args.jitter_ms)
    print(f"== {CUT}'s link down {args.down_s:g} s", flush=True)
    down = link_down(args)
    result = {
        "command": command(), "machine": machine(), "wall_s": round(time.monotonic() - started, 1),
        "backend": bad["backend"],
        "settings": {"devices": args.devices, "rounds": args.rounds, "round_timeout": args.round_timeout},
        "netem": [{"loss": args.loss, "delay_ms": args.delay_ms, "jitter_ms": args.jitter_ms,
                   "device_rounds_clean": device_rounds(clean), "device_rounds_completed": device_rounds(bad),
                   "lost": bad["lost"], "clean_run": clean, "impaired_run": bad}],
        "link_down": [down],
    }
    write_json(args.out, result)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(summary_markdown(result)))
    print(summary_markdown(result))


if __name__ == "__main__":
    main()
