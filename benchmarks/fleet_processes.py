"""Real fleet processes, for the end-to-end tests (test_fleet_e2e.py, test_fleet_bad_network.py) and the benchmarks
that run a fleet across hosts (bad_network.py): start them, stop them as an operator would, enroll devices, and
read the rounds the ServerApp recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.registry import Registry
from coordinator.registry.records import RoundRecord

BIN = Path(sys.executable).parent


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """``args`` in a session of its own (so it can be killed with its group), output to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_all(processes: list[subprocess.Popen]) -> list[psutil.Process]:
    """SIGTERM the agents, then the coordinator (the first), as an operator would; returns every descendant
    they had, to check none outlives them."""
    descendants = []
    for p in processes:
        try:
            descendants += psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            pass
    for p in processes[1:] + processes[:1]:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    return descendants


def recorded_rounds(state: Path) -> list[RoundRecord]:
    """The rounds the ServerApp has recorded in the registry so far."""
    with Registry(state_dir=state) as registry:
        return registry.list_rounds()


def enroll_all(state: Path, names: list[str]) -> dict[str, str]:
    """The operator's step before devices join: one-time tokens from `dress-fleet devices enroll`, by name."""
    made = subprocess.run([str(BIN / "dress-fleet"), "devices", "enroll", *names, "--token-only", "--state-dir",
                           str(state)], check=False, capture_output=True, text=True)
    tokens = made.stdout.split()
    if made.returncode != 0 or len(tokens) != len(names):
        raise RuntimeError(f"`dress-fleet devices enroll` gave no token per name:\n{made.stdout}{made.stderr}")
    return dict(zip(names, tokens, strict=True))


def enroll(state: Path, name: str) -> str:
    """One device's token (enroll_all)."""
    return enroll_all(state, [name])[name]


def wait_serving(address: str, timeout: float = 120.0) -> None:
    """Until the gRPC listener at ``address`` (plaintext, loopback) says SERVING; a loaded 2-core box starts slowly."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} never became SERVING")
