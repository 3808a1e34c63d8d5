"""The 10,000-device simulation on a two-node Ray cluster against one Ray on the same machine.

    python -m benchmarks.ray_cluster                     # writes benchmarks/results/ray-cluster.json
    python -m benchmarks.ray_cluster --devices 2000 --rounds 3 --out /tmp/ray.json

A head and a worker started with `ray start` on this machine, one CPU each (a multi-machine cluster is the same
commands on several hosts: README, "Simulating on a Ray cluster"), and `dress-fleet simulate --ray-address` on
it with `benchmarks.scale`'s settings (the run settings' defaults, 1 % of the fleet a round). Peak memory counts
the simulation's process tree and the cluster's processes together (sampled every second). The single-node
figure is `benchmarks.scale`'s SQLite run at the same settings (``--single-node``: its JSON), or measured here
(``--single-node run``).

The cluster is ``runtime.ray_cluster.Cluster``, as tests/test_simulation_ray_cluster.py starts it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

from benchmarks.common import command, machine, write_json
from runtime.processes import pick_port
from runtime.ray_cluster import RAY, Cluster, ray_env

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent

def _rss_mb(processes: set[psutil.Process]) -> float:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def simulate(args: argparse.Namespace, out: Path, ray_address: str | None, cluster: Cluster | None) -> dict:
    """`dress-fleet simulate` at the benchmark's settings; its metrics and the peak memory of everything it used."""
    cmd = [str(BIN / "dress-fleet"), "simulate", "--devices", str(args.devices), "--rounds", str(args.rounds),
           "--fraction", str(args.fraction), "--out", str(out), *(["--ray-address", ray_address] if ray_address else [])]
    proc = subprocess.Popen(cmd, stdout=open(out.parent / f"{out.name}.log", "wb"), stderr=subprocess.STDOUT,
                            env=ray_env())
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            try:
                tree = {psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)}
            except psutil.Error:
                continue
            peak[0] = max(peak[0], _rss_mb(tree | (cluster.processes() if cluster else set())))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"simulate failed ({rc}): {(out.parent / f'{out.name}.log').read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": metrics["wall_s"], "peak_mb": round(peak[0], 1), "ray": metrics.get("ray"),
            "accuracy": {f"{a['density']:g}": a["accuracy"] for a in metrics["accuracy"]},
            "heartbeats": metrics["heartbeats"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--single-node", default=str(RESULTS / "scale.json"),
                   help="the single-node figure: benchmarks.scale's JSON (its SQLite run), or 'run' to measure it here")
    p.add_argument("--out", type=Path, default=RESULTS / "ray-cluster.json")
    p.add_argument("--run-dir", type=Path, default=Path("runs/ray-cluster-bench"))
    args = p.parse_args()
    if RAY is None:
        raise SystemExit("the `ray` CLI is not installed (pip install 'dress-fleet[simulation]')")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="dress-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    port = pick_port()
    cluster = Cluster(f"127.0.0.1:{port}", root)
    try:
        cluster.start_node("--head", "--port", str(port), "--include-dashboard=false")
        cluster.start_node("--address", cluster.address)
        print(f"== {args.devices} devices on the two-node cluster at {cluster.address}", flush=True)
        on_cluster = simulate(args, args.run_dir / "cluster", cluster.address, cluster)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.single_node == "run":
        print(f"== {args.devices} devices on one Ray started for the run", flush=True)
        single = simulate(args, args.run_dir / "single", None, None)
        single_from = "measured in this run"
    else:
        scale = json.loads(Path(args.single_node).read_text())
        run = next(r for r in scale["runs"] if r["db"] == "sqlite")
        if (run["devices"], run["rounds"]) != (args.devices, args.rounds):
            raise SystemExit(f"{args.single_node}'s SQLite run has {run['devices']} devices and {run['rounds']} "
                             f"rounds, not {args.devices} and {args.rounds}: pass --single-node run")
        single = {"wall_s": run["wall_s"], "peak_mb": run["peak_rss_mb"]}
        single_from = f"{args.single_node}, its SQLite run ({scale['command']})"
    result = {"command": command(), "machine": machine(), "nodes": 2, "cpus_per_node": 1, "devices": args.devices,
              "rounds": args.rounds, "fraction": args.fraction, "wall_s": on_cluster["wall_s"],
              "peak_mb": on_cluster["peak_mb"], "single_node_wall_s": single["wall_s"],
              "single_node_peak_mb": single["peak_mb"], "single_node_from": single_from, "cluster_run": on_cluster}
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "cluster_run"}, indent=1))


if __name__ == "__main__":
    main()
