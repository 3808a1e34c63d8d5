"""kill -9 during rounds: a real coordinator and real agents (processes on loopback) are killed at random times,
each kill held until a device is training (a round in flight, counted in ``kills_mid_round``), then restarted
the way an operator or a supervisor would (same command, same --state-dir; agents without their token, from
their stored credential). The run must still finish every round, and nothing may be lost or doubled: each round
recorded once, model versions unique, each published version's checkpoint on disk; and no restart may print a
traceback (``restart_tracebacks``, counted in every start's output).

    python -m benchmarks.faults --kills 20            # also part of benchmarks/reliability.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from contracts.credentials import CREDENTIAL_FILE
from coordinator.registry import Registry
from runtime.processes import pick_port

BIN = Path(sys.executable).parent
# A killed member's children get SIGTERM from runtime/reaper.py and are SIGKILLed by it 10 s later if still
# there; one alive after this long is an orphan.
ORPHAN_AFTER_S = 20.0
MID_ROUND_WAIT_S = 60.0  # how long a kill waits for a device to be training


@dataclass
class Member:
    """One process of the fleet and how to start it again."""

    name: str
    cmd: list[str]
    log: Path
    until: Path | None = None  # while this file is missing (an agent's stored credential), start with ``first``
    first: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = self.cmd + (self.first if self.until is not None and not self.until.exists() else [])
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def kill(self) -> list[psutil.Process]:
        """SIGKILL the process alone (not its children: they must die with it by themselves); what it had."""
        assert self.proc is not None
        children = _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        return children

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Outcome:
    kills: int = 0
    kills_mid_round: int = 0  # kills that landed while a device was training the round (a ClientApp running)
    orphans: int = 0  # processes a killed member left running after it died
    timeline: list[dict[str, Any]] = field(default_factory=list)


def _training(members: list[Member]) -> bool:
    """A round is in flight: some member's SuperNode runs a ClientApp (Flower starts one per training message)."""
    for member in members:
        if member.proc is None or member.proc.poll() is not None:
            continue
        for p in _descendants(member.proc.pid):
            try:
                if any("flwr-clientapp" in part for part in p.cmdline()):
                    return True
            except psutil.Error:
                continue
    return False


def _await_training(members: list[Member], timeout_s: float) -> bool:
    """Wait for a round to be in flight, so that the kill lands mid-round; whether one was."""
    deadline = time.monotonic() + timeout_s
    while not _training(members):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


TRACEBACK = "Traceback (most recent call last)"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _rounds(state: Path) -> int:
    try:
        with Registry(state_dir=state) as registry:
            return registry.count_rounds()
    except Exception:  # noqa: BLE001 - the file may be mid-migration right after a restart
        return 0


def _revive(fleet: list[Member]) -> None:
    """Start again whatever exited on its own before the run ended: an agent whose coordinator stayed away
    longer than its connect timeout, a coordinator that found its port still held by its killed predecessor."""
    for member in fleet:
        if member.proc is not None and member.proc.poll() is not None:
            member.start()
            member.restarts += 1


def _enroll(state: Path, names: list[str]) -> list[str]:
    made = subprocess.run([str(BIN / "dress-fleet"), "devices", "enroll", *names, "--token-only", "--state-dir",
                           str(state)], capture_output=True, text=True, check=True)
    return made.stdout.split()


def run_faults(kills: int, agents: int = 3, rounds: int = 15, seed: int = 0,
               timeout_s: float = 1800.0) -> dict[str, Any]:
    """Kill ``kills`` times (a quarter of them the coordinator) while ``rounds`` rounds run; then check."""
    rng = random.Random(seed)
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        root = Path(tmp)
        state = root / "coordinator"
        superlink, control = pick_port(), pick_port()
        coordinator = Member("coordinator", [
            str(BIN / "dress-fleet"), "coordinator", "start", "--superlink-port", str(superlink),
            "--control-port", str(control), "--state-dir", str(state), "--rounds", str(rounds),
            "--min-devices", "1", "--fraction", "1", "--max-examples", "64", "--heartbeat-s", "1", "--seed", str(seed),
        ], root / "coordinator.log")  # fmt: skip
        state.mkdir(parents=True)
        names = [f"pi-{i}" for i in range(agents)]
        tokens = _enroll(state, names)
        fleet = [coordinator]
        for i, (name, token) in enumerate(zip(names, tokens)):
            base = [str(BIN / "dress-agent"), "join", "--device", "pi4", "--coordinator", f"127.0.0.1:{control}",
                    "--superlink", f"127.0.0.1:{superlink}", "--serve-port", str(pick_port()), "--metrics-port", "0",
                    "--supernode-port", str(pick_port()), "--partition-id", str(i), "--num-partitions", str(agents),
                    "--state-dir", str(root / name), "--calibration-repeats", "3", "--connect-timeout", "60"]
            # the token until the agent has stored the credential it buys, then that credential
            fleet.append(Member(name, base, root / f"{name}.log", root / name / CREDENTIAL_FILE, ["--token", token]))
        started = time.monotonic()
        try:
            for member in fleet:
                member.start()
            while outcome.kills < kills and _rounds(state) < rounds:
                time.sleep(rng.uniform(4.0, 12.0))
                if time.monotonic() - started > timeout_s:
                    break
                _revive(fleet)
                victim = coordinator if rng.random() < 0.25 else rng.choice(fleet[1:])
                if victim.proc is None or victim.proc.poll() is not None:
                    continue
                # while a device trains: the victim's own ClientApp, or for the coordinator any device's
                mid_round = _await_training([victim] if victim is not coordinator else fleet[1:], MID_ROUND_WAIT_S)
                done = _rounds(state)
                children = victim.kill()
                outcome.kills += 1
                outcome.kills_mid_round += mid_round
                killed_at = time.monotonic()
                while _alive(children) and time.monotonic() - killed_at < ORPHAN_AFTER_S:
                    time.sleep(0.1)
                gone_s = time.monotonic() - killed_at  # its children ended gracefully (SIGTERM) within this
                left = _alive(children)
                outcome.orphans += len(left)
                for p in left:
                    p.kill()
                outcome.timeline.append({"t_s": round(killed_at - started, 1), "killed": victim.name,
                                         "mid_round": mid_round, "rounds_done": done, "children": len(children),
                                         "children_gone_s": round(gone_s, 1), "orphans": len(left)})
                victim.start()
                victim.restarts += 1
            # the coordinator exits by itself after its last round
            while _rounds(state) < rounds and time.monotonic() - started < timeout_s:
                _revive(fleet)
                time.sleep(2.0)
        finally:
            for member in fleet[1:] + [coordinator]:
                member.stop()
        wall_s = time.monotonic() - started
        with Registry(state_dir=state) as registry:
            recorded = [r.round for r in registry.list_rounds()]
            participants = [len(r.participants) for r in registry.list_rounds()]  # a resumed run waits for its devices
            withheld = sum(bool(r.details.get("withheld")) for r in registry.list_rounds())
            versions = [r.model_version for r in registry.list_rounds() if r.model_version]
            published = {v: registry.model_checkpoint(v) for v in set(versions)}
        missing_checkpoints = [v for v, path in published.items() if not path or not Path(path).is_file()]
        complete = recorded == list(range(1, rounds + 1))
        lost = (len(set(range(1, rounds + 1)) - set(recorded)) + (len(recorded) - len(set(recorded)))
                + len(missing_checkpoints))
        tail = (root / "coordinator.log").read_text(errors="replace")[-3000:] if not complete else ""
        # what our commands printed across every start (a kill itself prints nothing: SIGKILL)
        tracebacks = sum(m.log.read_text(errors="replace").count(TRACEBACK) for m in fleet if m.log.exists())
    return {"kills": outcome.kills, "kills_mid_round": outcome.kills_mid_round, "restart_tracebacks": tracebacks,
            "runs_completed": int(complete), "lost": lost, "rounds": rounds, "participants": participants,
            "withheld": withheld,
            "agents": agents, "orphans": outcome.orphans, "wall_s": round(wall_s, 1),
            "restarts": {m.name: m.restarts for m in fleet}, "timeline": outcome.timeline,
            **({"coordinator_log_tail": tail} if tail else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(run_faults(args.kills, args.agents, args.rounds, args.seed), indent=2))


if __name__ == "__main__":
    main()
