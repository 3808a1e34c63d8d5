"""`dress-fleet simulate --ray-address`: the virtual devices train on an existing Ray cluster, not on a Ray started
for the run. The cluster here is a head and a worker that `ray start` made on this machine as two nodes of one CPU
each; a multi-machine cluster is the same commands on several hosts (README: Simulating on a Ray cluster).

The test stops exactly the Ray processes it started: those in the sessions its `ray start` commands left their
daemons in, or with its own --temp-dir in their command line, and what they spawned. Never `ray stop`, which
would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from runtime.processes import pick_port

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").is_file() else shutil.which("ray")
needs_ray = pytest.mark.skipif(RAY is None,
                               reason="the `ray` CLI is not installed (pip install 'dress-fleet[simulation]')")

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


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # short: Ray's unix sockets lie under it, and a socket's path may not pass 107 characters
    root = Path(tempfile.mkdtemp(prefix="dress-ray-", dir="/tmp"))
    port = pick_port()
    made = Cluster(f"127.0.0.1:{port}", root)
    try:
        made.start_node("--head", "--port", str(port), "--include-dashboard=false")
        made.start_node("--address", made.address)
        yield made
    finally:
        made.stop()
        leftover = made.processes()
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"Ray processes of the test still running: {leftover}"


JOBS_AND_ACTORS = """
import json, ray
from ray._private import state
ray.init(logging_level="ERROR", log_to_driver=False)
print(json.dumps({"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                  "drivers": [j.get("Entrypoint", "") for j in state.jobs()],
                  "actors": [[a["ActorClassName"], a["Address"]["NodeID"]] for a in state.actors().values()]}))
"""


@needs_ray
@pytest.mark.timeout(420)
def test_simulate_runs_on_an_existing_two_node_ray_cluster(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [str(BIN / "dress-fleet"), "simulate", "--devices", "4", "--rounds", "1", "--fraction", "1",
         "--max-examples", "32", "--eval-examples", "200", "--traces", "constant", "--out", str(out),
         "--validation", "200",  # the last round is judged on 200 held-out images, not the 10,000 test images
         "--ray-address", cluster.address],
        capture_output=True, text=True, timeout=240, env=ray_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"on the Ray cluster at {cluster.address}" in " ".join(done.stdout.split())
    assert "round 1/1: 4 devices, acc" in done.stdout  # not a terminal: a line per round, not a bar
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == 1 and len(metrics["per_round"][0]["participants"]) == 4
    # where it ran, as the report records it: the cluster's two nodes of one CPU each
    assert metrics["ray"] == {"address": cluster.address, "nodes": 2, "cpus": 2.0, "version": metrics["ray"]["version"]}
    assert metrics["settings"]["ray_address"] == cluster.address
    assert f"Ray: the cluster at `{cluster.address}` (2 nodes, 2 CPUs" in (out / "report.md").read_text()

    # and as the cluster itself knows it: Flower's flwr-simulation was a driver of this cluster, and its ClientApp
    # actors (one CPU each, so one per node) ran on both nodes
    asked = subprocess.run([sys.executable, "-c", JOBS_AND_ACTORS], capture_output=True, text=True, timeout=60,
                           env=ray_env() | {"RAY_ADDRESS": cluster.address})
    assert asked.returncode == 0, asked.stderr[-3000:]
    seen = json.loads(asked.stdout.strip().splitlines()[-1])
    assert len(seen["nodes"]) == 2
    assert any("flwr-simulation" in entrypoint for entrypoint in seen["drivers"]), seen["drivers"]
    actors = [node for name, node in seen["actors"] if name == "ClientAppActor"]
    assert sorted(set(actors)) == seen["nodes"], seen["actors"]


@pytest.mark.parametrize("address", ["head", "http://head:6379", "head:0", "head:99999", "head:6379/x", "a b:1"])
def test_a_malformed_ray_address_is_refused_before_anything_starts(tmp_path: Path, address: str) -> None:
    from typer.testing import CliRunner

    from cli.fleet import app

    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--ray-address", address])
    assert result.exit_code != 0
    said = " ".join(result.output.split())
    assert "--ray-address must be HOST:PORT" in said and "ray://HOST[:PORT]" in said, result.output
    assert not (tmp_path / "run").exists()
