"""End to end with real processes on loopback: `dress-fleet coordinator start` + `dress-agent join`.

A federated round on a small real slice, the fleet a new user starts on one machine (plaintext on loopback); the
device gets a density in the registry; Predict answers after training; stopping leaves no process behind. One
agent: several devices training rounds together, each with its own address, is test_fleet_bad_network.py's (three
agents across hosts), and each agent here costs the suite seconds it must not spend.
A budget change reaching the served density and the registry row within a heartbeat is test_agent_cli.py's. The
TLS fleet runs here only where network namespaces cannot be made; elsewhere test_fleet_bad_network.py runs it
across hosts.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import DeviceStub, pick_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import netns
from benchmarks.fleet_processes import BIN, enroll, recorded_rounds, spawn, stop_all, wait_serving
from contracts.credentials import supernode_key
from coordinator.registry import Registry
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_pb_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from runtime.processes import flwr, supernode_status, unregister_supernode

HEARTBEAT_S = 0.5


def served_density(agent: str) -> float:
    """The density the agent's Predict runs right now (its Status RPC; polling a CLI would be too slow)."""
    with grpc.insecure_channel(agent) as channel:
        return agent_pb_grpc.AgentStub(channel).Status(agent_pb.StatusRequest(), timeout=10).density


def cli_predict(agent: str) -> float:
    out = subprocess.run(
        [str(BIN / "dress-agent"), "predict", "--agent", agent, "--density-only"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return float(out.stdout.strip().split()[-1])


def test_coordinator_and_an_agent_train_a_round_on_loopback(tmp_path: Path) -> None:
    superlink, control = pick_port(), pick_port()
    state = tmp_path / "coordinator"
    coordinator = spawn(
        [str(BIN / "dress-fleet"), "coordinator", "start", "--superlink-port", str(superlink),
         "--control-port", str(control), "--state-dir", str(state), "--rounds", "1", "--min-devices", "1",
         "--fraction", "1", "--max-examples", "64"],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    processes = [coordinator]
    try:
        wait_serving(f"127.0.0.1:{control}")
        name, predict = "pi-1", f"127.0.0.1:{pick_port()}"
        trace = tmp_path / f"{name}.csv"  # room for every subnet, so it trains the dense one
        trace.write_text("t_s,latency_ms,memory_mb\n0,1000,100\n")
        processes.append(spawn(
            [str(BIN / "dress-agent"), "join", "--device", "pi4", "--token", enroll(state, name),
             "--coordinator", f"127.0.0.1:{control}", "--superlink", f"127.0.0.1:{superlink}",
             "--serve-port", predict.rpartition(":")[2], "--metrics-port", "0", "--supernode-port", str(pick_port()),
             "--heartbeat-interval", str(HEARTBEAT_S), "--budget-trace", str(trace), "--calibration-repeats", "5",
             "--training-calibration-steps", "1", "--state-dir", str(tmp_path / name)],
            tmp_path / f"{name}.log",
        ))  # fmt: skip
        wait_serving(predict)
        assert served_density(predict) == 1.0

        deadline = time.monotonic() + 240
        while not recorded_rounds(state):
            assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "coordinator.log").read_text()[-4000:]
            time.sleep(1)
        with Registry(state_dir=state) as registry:
            [device] = registry.list_devices()
            assert device.name == name and device.current_density == 1.0 and device.last_budget is not None
            assert registry.device_history(device.id)
            rounds = registry.list_rounds()
            assert [r.round for r in rounds] == [1] and rounds[0].model_version == "round-1"  # published
            # by name, for the live view: the device trained the dense model
            assert rounds[0].details["participants"] == {name: 1.0} and set(rounds[0].participants) == {device.id}
            assert device.flower_node_id is not None  # learnt by the status query
        assert cli_predict(predict) == 1.0  # Predict answers after training, through the CLI a person uses
    finally:
        descendants = stop_all(processes)
    assert coordinator.returncode == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.skipif(netns.unavailable() is None,
                    reason="the same TLS fleet runs across hosts in test_fleet_bad_network.py")
def test_a_tls_fleet_trains_and_a_plaintext_caller_is_refused(tmp_path: Path) -> None:
    """`certs init`, a coordinator with --certs and an agent with --ca: SuperLink, SuperNode, control plane and the
    flwr CLI all on TLS, one round trained; a caller without the CA gets no answer from the control plane.

    On loopback, and only where network namespaces cannot be made: test_fleet_bad_network.py checks all of this
    across hosts (each its own address, the certificates naming them) wherever they can."""
    certs = tmp_path / "certs"
    made = subprocess.run([str(BIN / "dress-fleet"), "certs", "init", "--dir", str(certs)], capture_output=True,
                          text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    superlink, control = pick_port(), pick_port()
    state = tmp_path / "coordinator"
    coordinator = spawn(
        [str(BIN / "dress-fleet"), "coordinator", "start", "--superlink-port", str(superlink),
         "--control-port", str(control), "--state-dir", str(state), "--rounds", "1", "--min-devices", "1",
         "--fraction", "1", "--max-examples", "32", "--certs", str(certs)],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    processes = [coordinator]
    try:
        credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{control}", credentials) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)
            token = enroll(state, "pi-tls")
            stub = DeviceStub(channel, token)
            request = pb.RegisterRequest(profile="pi4", calibration=[
                pb.CalibrationPoint(level=level, latency_ms=10, memory_mb=100) for level in range(4)])
            for bad_key, message in (("", "OpenSSH line"), ("ssh-rsa AAAA", "not an OpenSSH public key")):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Register(pb.RegisterRequest(supernode_public_key=bad_key, calibration=request.calibration,
                                                     profile="pi4"), timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
                assert "this fleet authenticates SuperNodes" in caught.value.details() and message in \
                    caught.value.details()
        for issue in (["pi-tls"], ["app", "--client"]):  # the agent's Predict certificate, a caller's
            made = subprocess.run([str(BIN / "dress-fleet"), "certs", "issue", *issue, "--dir", str(certs)],
                                  capture_output=True, text=True)
            assert made.returncode == 0, made.stdout + made.stderr
        predict_port = pick_port()
        with grpc.insecure_channel(f"127.0.0.1:{control}") as plain:  # a stranger speaking plaintext
            try:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
                raise AssertionError("the TLS control plane answered a plaintext caller")
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        join = [str(BIN / "dress-agent"), "join", "--device", "pi4",
                "--coordinator", f"127.0.0.1:{control}", "--superlink", f"127.0.0.1:{superlink}",
                "--ca", str(certs / "ca.pem"), "--serve-port", str(predict_port), "--metrics-port", "0", "--supernode-port", str(pick_port()),
                "--serve-host", "0.0.0.0", "--predict-cert", str(certs / "pi-tls.pem"),
                "--predict-key", str(certs / "pi-tls.key"),
                "--state-dir", str(tmp_path / "pi-tls")]  # fmt: skip
        processes.append(spawn([*join, "--token", token], tmp_path / "pi-tls.log"))  # unspent by the refusals
        deadline = time.monotonic() + 240
        while len(recorded_rounds(state)) < 1:
            assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()[-4000:]
            assert processes[1].poll() is None, (tmp_path / "pi-tls.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "coordinator.log").read_text()[-4000:]
            time.sleep(1)
        assert len(recorded_rounds(state)[0].participants) == 1  # the agent trained through its TLS SuperNode
        # Predict beyond loopback: mutual TLS, the fleet's client certificate or nothing
        client = ["--ca", str(certs / "ca.pem"), "--cert", str(certs / "app.pem"), "--key", str(certs / "app.key")]
        for extra, ok in ((client, True), ([], False), (client[:2], False)):
            status = subprocess.run([str(BIN / "dress-agent"), "status", "--agent", f"127.0.0.1:{predict_port}",
                                     "--timeout", "5", *extra], capture_output=True, text=True)
            assert (status.returncode == 0) == ok, status.stdout + status.stderr
            assert ("pi-tls (pi4)" in status.stdout) == ok
        with Registry(state_dir=state) as registry:
            [device] = registry.list_devices()
        assert device.flower_node_id is not None  # bound when its SuperNode key was registered, not by its word

        # Strangers' SuperNodes, one with a key nobody registered and one with none, are not admitted.
        supernode_key(tmp_path / "stranger")  # a valid key pair the coordinator never registered
        for name, key in (("stranger-keyed", [str(tmp_path / "stranger" / "supernode.key")]), ("stranger-bare", [])):
            processes.append(spawn(
                [str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.pem"),
                 "--superlink", f"127.0.0.1:{superlink}", "--port", str(pick_port()),
                 "--node-config", f'device-name="{device.name}"',
                 *(["--auth-supernode-private-key", *key] if key else [])],
                tmp_path / f"{name}.log",
            ))  # fmt: skip
        time.sleep(8)
        nodes = flwr(state, "supernode", "ls", "local")["nodes"]
        assert [int(n["node-id"]) for n in nodes] == [device.flower_node_id], nodes
        for name in ("stranger-keyed", "stranger-bare"):  # Flower's own refusal, in each stranger's log
            log = (tmp_path / f"{name}.log").read_text()
            assert "could not establish a connection to the SuperLink" in log, log[-2000:]

        # The operator removes the device's key at the SuperLink; restarted from its stored credential, the agent
        # is told its key is retired, makes a new one, and its SuperNode connects again.
        unregister_supernode(state, device.flower_node_id)
        processes[1].send_signal(signal.SIGTERM)
        processes[1].wait(timeout=60)
        processes[1] = spawn(join, tmp_path / "pi-tls-again.log")
        deadline = time.monotonic() + 120
        while True:
            with Registry(state_dir=state) as registry:
                node = registry.supernode_of(device.name)[1]
            if node not in (None, device.flower_node_id) and supernode_status(state, node) == "online":
                break
            assert processes[1].poll() is None, (tmp_path / "pi-tls-again.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "pi-tls-again.log").read_text()[-3000:]
            time.sleep(2)
        assert "making a new one" in (tmp_path / "pi-tls-again.log").read_text()
    finally:
        stop_all(processes)
