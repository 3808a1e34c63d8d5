"""`dress-fleet simulate --ray-address`: the virtual devices train on an existing Ray cluster, not on a Ray started
for the run. The cluster here is a head and a worker that `ray start` made on this machine as two nodes of one CPU
each; a multi-machine cluster is the same commands on several hosts (README: Simulating on a Ray cluster).

The test stops exactly the Ray processes it started: those in the sessions its `ray start` commands left their
daemons in, or with its own --temp-dir in their command line, and what they spawned. Never `ray stop`, which
would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.processes import pick_port
from runtime.ray_cluster import RAY, Cluster, ray_env

BIN = Path(sys.executable).parent
needs_ray = pytest.mark.skipif(RAY is None,
                               reason="the `ray` CLI is not installed (pip install 'dress-fleet[simulation]')")

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
