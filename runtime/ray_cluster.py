"""A Ray cluster of several nodes on this machine, made with `ray start` as on several hosts: what the tests and the
benchmarks run `dress-fleet simulate --ray-address` against.

Each node gets its own ports and ``--temp-dir``, so two nodes (and any other Ray here) never clash. ``stop`` ends
exactly the processes this cluster started: those in the sessions its `ray start` commands left their daemons in,
or with its own temp dir in their command line, and what they spawned. Never `ray stop`, which would stop every
Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from runtime.processes import pick_port

RAY = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").is_file() else shutil.which("ray")

# Every port a node listens on that has a fixed default: two nodes on one host (and any other Ray here) would clash.
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
HEAD_PORTS = ("--ray-client-server-port", "--dashboard-port")


@dataclass
class Cluster:
    address: str  # the head's GCS, HOST:PORT
    root: Path  # both nodes' --temp-dir lie under it: it marks this test's processes
    sessions: list[int] = field(default_factory=list)  # the sessions `ray start` left each node's daemons in

    def start_node(self, *args: str, timeout: float = 90.0) -> None:
        """`ray start` returns once the node is up, leaving its daemons in the session it was started in."""
        name = "head" if "--head" in args else "worker"
        ports = [x for flag in NODE_PORTS + (HEAD_PORTS if name == "head" else ()) for x in (flag, str(pick_port()))]
        cmd = [RAY, "start", *args, "--num-cpus", "1", "--temp-dir", str(self.root / name), "--disable-usage-stats",
               *ports]
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=ray_env())
            self.sessions.append(proc.pid)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"`ray start` of the {name} failed ({rc}):\n"
                               + (self.root / f"{name}.log").read_text(errors="replace")[-3000:])

    def processes(self) -> set[psutil.Process]:
        ours: set[psutil.Process] = set()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if os.getsid(p.pid) in self.sessions or str(self.root) in " ".join(p.info["cmdline"] or ()):
                    ours.add(p)
            except (OSError, psutil.Error):
                continue
        for p in list(ours):
            try:
                ours.update(p.children(recursive=True))
            except psutil.Error:
                continue
        ours.discard(psutil.Process())
        return {p for p in ours if _running(p)}

    def stop(self) -> None:
        ours = self.processes()
        for p in ours:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(ours, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=5)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ray_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: only --address and --ray-address say which cluster is meant."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}




