"""`dress-agent`: refusals with clear messages, and one whole `join` (a real process) from start to SIGTERM.

The joined agent's SuperNode points at a SuperLink that does not exist: it keeps retrying, which is all this
test needs from it (starting, and stopping with nothing left behind). Training through it is the lead's
end-to-end test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import architecture, pick_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from agent.calibration import initial_model
from agent.lifecycle import Agent, AgentConfig, AgentError, heartbeat_interval
from agent.monitor import DEFAULT_INTERVAL_S
from cli.agent import app
from contracts.credentials import CREDENTIAL_FILE, StoredCredential
from contracts.profiles import get_profile
from coordinator import control_plane
from coordinator.registry import Registry
from runtime import processes

DRESS_AGENT = Path(sys.executable).parent / "dress-agent"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def _join(*extra: str, coordinator: str = "127.0.0.1:1") -> tuple[int, str]:
    return _run("join", "--coordinator", coordinator, "--superlink", "127.0.0.1:2", *extra)


def test_help_explains_the_commands() -> None:
    code, output = _run("--help")
    assert code == 0
    for command in ("join", "predict", "status"):
        assert command in output
    code, output = _run("--version")
    assert code == 0 and output.startswith("dress-agent ")


def test_unknown_profile_lists_the_valid_ones() -> None:
    code, output = _join("--device", "pi9")
    assert code == 2
    assert "unknown device profile 'pi9'; valid profiles: jetson-nano, jetson-orin-nano, laptop-x86, phone, " \
           "pi4, pi5" in output


@pytest.mark.parametrize(("extra", "message"), [
    (("--coordinator", "localhost"), "--coordinator must be HOST:PORT, got 'localhost'"),
    (("--coordinator", "h:99999"), "--coordinator must be HOST:PORT, got 'h:99999'"),
    (("--name", "my pi"), "--name: a device name must be 1-128 letters, digits"),
    (("--partition-id", "3", "--num-partitions", "3"), "--partition-id must be below --num-partitions (3), got 3"),
    (("--check-set", "fashion-mnist:none"), "--check-set 'fashion-mnist:none': N must be a whole number"),
])
def test_bad_options_exit_2_with_the_reason(extra: tuple[str, ...], message: str) -> None:
    code, output = _join("--device", "pi4", *extra)
    assert code == 2
    assert message in output


def test_bad_budget_trace_says_which_line(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("t_s,latency_ms,memory_mb\n0,100,512\n5,100\n")
    code, output = _join("--device", "pi4", "--budget-trace", str(trace))
    assert code == 2
    assert f"{trace}:3: expected 3 values" in output


def test_unreachable_coordinator() -> None:
    address = f"127.0.0.1:{pick_port()}"
    start = time.monotonic()
    code, output = _join("--device", "pi4", "--connect-timeout", "0.5", coordinator=address)
    assert code == 1
    assert f"cannot reach coordinator at {address}" in output
    assert time.monotonic() - start < 5


def test_predict_against_no_agent() -> None:
    address = f"127.0.0.1:{pick_port()}"
    code, output = _run("predict", "--agent", address, "--timeout", "1")
    assert code == 1
    assert f"cannot reach agent at {address}" in output


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[str, Registry]]:
    """A real control plane with model version v1 published."""
    model = initial_model(architecture("cnn", "1,0.5,0.25,0.1", "fashion-mnist", 16))
    registry = Registry(f"sqlite:///{tmp_path / 'registry.sqlite3'}")
    registry.add_model_version("v1", "/models/v1", model.densities)
    port = pick_port()
    arch = architecture("cnn", "1,0.5,0.25,0.1", "fashion-mnist", 16)
    server = control_plane.serve(registry, "127.0.0.1", port, arch, lambda version, density, half: model.to_bytes(half))
    yield f"127.0.0.1:{port}", registry
    server.stop(grace=None).wait()
    registry.close()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def test_join_serves_follows_its_budget_and_leaves_nothing_behind(
    tmp_path: Path, coordinator: tuple[str, Registry]
) -> None:
    address, registry = coordinator
    token = registry.enroll(["pi-test"])["pi-test"]
    trace = tmp_path / "trace.csv"  # 100 MB: every subnet fits (the densest needs ~1.3 MB); 0.5 MB: up to 0.25
    trace.write_text("t_s,latency_ms,memory_mb\n0,1000,100\n2,1000,0.5\n")
    predict, metrics_port = f"127.0.0.1:{pick_port()}", pick_port()
    agent = subprocess.Popen(
        [str(DRESS_AGENT), "join", "--device", "pi4", "--token", token, "--coordinator", address,
         "--superlink", f"127.0.0.1:{pick_port()}", "--serve-port", predict.rpartition(":")[2],
         "--metrics-port", str(metrics_port),
         "--supernode-port", str(pick_port()), "--budget-trace", str(trace), "--heartbeat-interval", "0.2",
         "--state-dir", str(tmp_path / "agent"), "--calibration-repeats", "5", "--partition-id", "1",
         "--num-partitions", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 60
        while not _serving(predict):
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() < deadline, "agent did not start serving"
            time.sleep(0.2)
        children = psutil.Process(agent.pid).children(recursive=True)
        supernode = next(" ".join(c.cmdline()) for c in children if "flower-supernode" in " ".join(c.cmdline()))
        assert 'device-name="pi-test" profile="pi4" partition-id=1 num-partitions=4' in supernode

        code, output = _run("status", "--agent", predict)
        assert code == 0 and "pi-test (pi4)" in output and "model version v1" in output
        deadline = time.monotonic() + 10
        while "density 0.25 (assigned 0.25)" not in _run("status", "--agent", predict)[1]:
            assert time.monotonic() < deadline, "the trace's tight budget never moved the served density"
            time.sleep(0.1)
        assert [d.current_density for d in registry.list_devices() if d.name == "pi-test"] == [0.25]
        code, output = _run("predict", "--agent", predict, "--density-only")
        assert (code, output) == (0, "0.25")
        code, output = _run("predict", "--agent", predict, "--index", "3")
        assert code == 0 and "image 3: predicted class" in output and "density 0.25" in output
        assert _run("predict", "--agent", predict, "--deadline-ms", "0.0001")[0] == 0  # no subnet can meet it
        # its metrics, as Prometheus scrapes them (plaintext: Predict is on loopback)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(reply.read().decode()) for s in family.samples}
        assert samples[("dress_agent_density", (("kind", "serving"),))] == 0.25
        assert samples[("dress_agent_predict_latency_seconds_count", (("density", "0.25"),))] == 2
        assert samples[("dress_agent_predict_latency_seconds_count", (("density", "0.1"),))] == 1
        assert samples[("dress_agent_deadline_misses_total", (("density", "0.1"),))] == 1  # the sparsest answered
        assert samples[("dress_agent_heartbeats_total", (("outcome", "answered"),))] >= 2
    finally:
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, output
    assert "shutting down: budget monitor, Predict server, SuperNode" in output
    assert "dress-agent pi-test stopped" in output
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not _serving(predict)
    assert (tmp_path / "agent" / "logs" / "supernode-pi-test.log").is_file()  # under --state-dir, as printed
    stored = StoredCredential.load(tmp_path / "agent")  # the token bought a credential, kept for the next join
    assert stored is not None and stored.name == "pi-test" and stored.coordinator == address
    assert (tmp_path / "agent" / CREDENTIAL_FILE).stat().st_mode & 0o777 == 0o600
    assert registry.authenticate(stored.credential) is not None and registry.authenticate(token) is None


def test_join_without_enrollment_says_how_to_enroll(tmp_path: Path, coordinator: tuple[str, Registry]) -> None:
    code, output = _join("--device", "pi4", "--state-dir", str(tmp_path / "agent"), coordinator=coordinator[0])
    assert code == 1 and "this device is not enrolled" in output and "dress-fleet devices enroll NAME" in output


def test_a_stranger_token_is_refused(tmp_path: Path, coordinator: tuple[str, Registry]) -> None:
    code, output = _join("--device", "pi4", "--token", "dfe_guessed", "--calibration-repeats", "1",
                         "--state-dir", str(tmp_path / "agent"), coordinator=coordinator[0])
    assert code == 1 and "UNAUTHENTICATED" in output and coordinator[1].list_devices() == []
    assert not (tmp_path / "agent" / CREDENTIAL_FILE).exists()


def test_a_check_set_that_cannot_be_read_is_refused_before_the_token_is_spent(
        tmp_path: Path, coordinator: tuple[str, Registry]) -> None:
    address, registry = coordinator
    token = registry.enroll(["pi-check"])["pi-check"]
    empty = tmp_path / "no-data"
    empty.mkdir()
    code, output = _join("--device", "pi4", "--token", token, "--check-set", "cifar10:64", "--data-dir", str(empty),
                         "--state-dir", str(tmp_path / "agent"), coordinator=address)
    assert code == 2 and "--check-set:" in output and "cifar10" in output, output
    assert registry.list_devices() == []  # not registered: the token still enrolls it once fixed


def test_a_supernode_port_still_held_is_waited_for_then_refused_clearly(
    tmp_path: Path, coordinator: tuple[str, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart right after kill -9 may find its SuperNode port held until the old tree is reaped: the agent
    waits for it, and if it stays held says by whom, with no traceback."""
    monkeypatch.setattr(processes, "PREDECESSOR_WAIT_S", 2.0)
    token = coordinator[1].enroll(["pi-port"])["pi-port"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        started = time.monotonic()
        code, output = _join("--device", "pi4", "--token", token, "--calibration-repeats", "1",
                             "--supernode-port", str(holder.getsockname()[1]), "--serve-port", str(pick_port()), "--metrics-port", "0",
                             "--state-dir", str(tmp_path / "agent"), coordinator=coordinator[0])
    assert code == 1 and "cannot start the SuperNode supernode-pi-port" in output and f"held by pid {os.getpid()}" in output
    assert "Traceback" not in output and time.monotonic() - started >= 2.0


def _secret(state_dir: Path, **config: object) -> str:
    settings: dict = {"name": None, "coordinator": "127.0.0.1:1", "token": None, **config}
    return Agent(AgentConfig(profile=get_profile("pi4"), superlink="127.0.0.1:2", budget=None,  # type: ignore[arg-type]
                             state_dir=state_dir, **settings))._secret()


def test_a_restart_proves_itself_with_the_stored_credential(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="not enrolled"):
        _secret(tmp_path)
    StoredCredential("pi-a", 7, "dfd_secret", "127.0.0.1:1").save(tmp_path)
    assert _secret(tmp_path) == _secret(tmp_path, name="pi-a") == "dfd_secret"
    with pytest.raises(AgentError, match="is for the coordinator at 127.0.0.1:1, not 127.0.0.1:2"):
        _secret(tmp_path, coordinator="127.0.0.1:2")  # never shown to another coordinator
    with pytest.raises(AgentError, match="is device 'pi-a''s, not 'pi-b'"):
        _secret(tmp_path, name="pi-b")
    assert _secret(tmp_path, token="dfe_new") == "dfe_new"  # a token re-enrolls, whatever is stored
    (tmp_path / CREDENTIAL_FILE).write_text("{not json")
    with pytest.raises(AgentError, match="is not a device credential"):
        _secret(tmp_path)


@pytest.mark.parametrize("wanted,asked,expected", [
    (None, 12.0, 12.0),  # the coordinator's period by default
    (2.0, 12.0, 2.0),  # more often is the device's choice
    (30.0, 12.0, 12.0),  # less often would look offline: capped
    (None, 0.0, DEFAULT_INTERVAL_S),  # a coordinator that asks nothing
])
def test_heartbeat_period_never_exceeds_what_the_coordinator_asks(wanted, asked, expected) -> None:
    assert heartbeat_interval(wanted, asked) == expected


def test_plaintext_beyond_loopback_is_refused() -> None:
    """Without the fleet's CA an agent talks to a coordinator or SuperLink on loopback only."""
    for coordinator, superlink in (("10.9.9.9:9093", "127.0.0.1:9092"), ("127.0.0.1:9093", "10.9.9.9:9092")):
        code, output = _run("join", "--device", "pi4", "--coordinator", coordinator, "--superlink", superlink,
                            "--connect-timeout", "0.5", "--state-dir", "/tmp/never-created")
        assert code != 0 and "plaintext is for loopback only" in output
