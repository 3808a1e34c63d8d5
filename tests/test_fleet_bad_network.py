"""Across hosts, on bad links: a TLS fleet whose coordinator, three agents and operator each run on a host of their
own; rounds go on with whoever answers, a device cut off comes back alone, and callers without the fleet's
credentials are refused.

Each host is a Linux network namespace with its own address on one bridge (benchmarks/netns.py), so every
connection crosses a network: the agents reach the control plane and the SuperLink (through the coordinator's
nginx) at the coordinator's address, and the operator reaches every agent's Predict at the agent's. The
certificates name those addresses (`dress-fleet certs init --host`, `certs issue --host | --client`). Every
device's link is impaired (delay, jitter and loss: netem, or its user-space stand-in where the kernel has no
netem). During the run one device's link goes down at the switch for longer than a round, then comes back up:

- the round it misses still completes, by the round timeout at the latest, with the devices that answered, and is
  recorded without it;
- the same agent process (no restart) re-joins by itself and trains a later round;
- nothing is lost: every round recorded once with its published model version, every device's row and density;
- while cut off the agent does not hot-loop: its CPU time and the retries it logged stay within what
  exponential backoff allows.

Meanwhile, on other hosts: strangers' SuperNodes (a key nobody registered, and none) try the SuperLink and are not
admitted; the operator removes another device's SuperNode key at the SuperLink, and that agent, restarted from its
stored credential with a new Predict certificate, makes a new key and connects again. Once the cut-off device is
back `dress-fleet devices` lists all three online, and at the end, with every agent serving the last published
model, from the operator's host (tests/netns_operator.py, `dress-agent status`) Predict answers over mutual TLS
only, the control plane and the SuperLink answer the fleet's TLS and refuse plaintext, and registering a missing
or malformed SuperNode key is refused.

Skipped where namespaces cannot be made (not root, no iproute2, or `ip netns add` refused); where links cannot be
impaired it runs on clean links and warns. test_fleet_e2e.py runs the same TLS checks on loopback only where this
test is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cryptography import x509

from benchmarks.fleet_processes import BIN, recorded_rounds, spawn, stop_all
from benchmarks.netns import Network, hosts, impairment_unavailable, unavailable
from contracts.credentials import StoredCredential, supernode_key
from coordinator.registry import Registry
from coordinator.registry.records import RoundRecord
from runtime.certificates import init_certificates, issue_certificate
from runtime.processes import flower_env

DEVICES = {"pi-1": "pi4", "jetson-1": "jetson-nano", "phone-1": "phone"}  # name -> profile
CUT = "jetson-1"  # the device whose link goes down
RENEWED = "pi-1"  # the device whose SuperNode key (and Predict certificate) the operator renews while CUT is cut off
ASKED = "phone-1"  # the agent the operator asks through `dress-agent status`
OPERATOR = "operator"
SUPERLINK_PORT, CONTROL_PORT, PREDICT_PORT = 9092, 9093, 50061  # every host has ports of its own
DELAY_MS, JITTER_MS, LOSS_PCT = 20.0, 5.0, 2.0  # every device's link, each way
HEARTBEAT_S = 1.0  # the coordinator's: a device silent for 6 of them is offline and not drawn
AGENT_HEARTBEAT_S = 0.5
ROUND_TIMEOUT_S = 40.0  # a round's devices answer within ~25 s on a loaded 2-core machine
ROUNDS = 5  # one before the cut, one missed, one it is still offline for, two to come back in
OUTAGE_MIN_S = 30.0  # the cut lasts at least this long, and until a round completed without the device
PROBE = Path(__file__).with_name("netns_operator.py")


@pytest.fixture
def network() -> Iterator[tuple[Network, str]]:
    """The coordinator's, each device's and the operator's host, and what the device links are like; removed after
    the test (whose own cleanup, which runs first, stops the processes in them)."""
    if reason := unavailable():
        pytest.skip(f"cannot make network namespaces: {reason}")
    with contextlib.ExitStack() as stack:
        try:
            network = stack.enter_context(hosts("coordinator", *DEVICES, OPERATOR))
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make network namespaces: `{shlex.join(e.cmd)}` failed: {(e.stderr or '').strip()}")
        try:
            if reason := impairment_unavailable():
                raise RuntimeError(reason)
            for name in DEVICES:
                network.impair(name, DELAY_MS, JITTER_MS, LOSS_PCT)
            links = f"{DELAY_MS:g} ± {JITTER_MS:g} ms, {LOSS_PCT:g} % loss ({network.impairment_backend()})"
        except RuntimeError as e:  # the rest still holds on clean links: the cut, the re-join, the refusals
            for name in DEVICES:
                with contextlib.suppress(RuntimeError):
                    network.impair(name)
            links = "clean"
            warnings.warn(f"device links not impaired, the test runs on clean links: cannot impair links here: {e}",
                          stacklevel=1)
        yield network, links


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def tree_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of a process and of each of its descendants, by pid."""
    seen = {}
    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                seen[p.pid] = cpu_s(p)
    except psutil.Error:
        pass
    return seen


def supernodes(pid: int) -> set[int]:
    """The pids of the Flower SuperNodes an agent runs."""
    found = set()
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a ClientApp that has just ended
                if any(part.endswith("flower-supernode") for part in p.cmdline()[:2]):
                    found.add(p.pid)
    return found


def names_of(cert: Path) -> list[str]:
    """The names and addresses a certificate is for (its subject alternative names)."""
    found = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return sorted(map(str, [*found.get_values_for_type(x509.DNSName), *found.get_values_for_type(x509.IPAddress)]))


def fleet_cli(*args: str | Path) -> subprocess.Popen:
    """`dress-fleet ARGS` on this machine, started (a Python start is seconds here: run beside other work)."""
    return subprocess.Popen([str(BIN / "dress-fleet"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})


def finished(p: subprocess.Popen, timeout: float = 120) -> str:
    """The output of a process fleet_cli (or alike) started, which must have succeeded."""
    out = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, f"`{shlex.join(map(str, p.args))}` failed ({p.returncode}):\n{out}"
    return out


@pytest.mark.timeout(420)  # about 4-4.5 min on 2 busy cores: pytest's default 300 s would leave little room
def test_a_tls_fleet_across_hosts_on_bad_links(network: tuple[Network, str], tmp_path: Path) -> None:
    net, links = network
    coordinator_host = net.address("coordinator")
    control, superlink = f"{coordinator_host}:{CONTROL_PORT}", f"{coordinator_host}:{SUPERLINK_PORT}"
    predict = {name: f"{net.address(name)}:{PREDICT_PORT}" for name in DEVICES}
    certs, state = tmp_path / "certs", tmp_path / "coordinator"
    # The operator's first steps (`certs init --host`, `certs issue --host`, `devices enroll`; a CLI start costs
    # seconds here, so the CLI runs during the outage, off the critical path): the fleet's CA and the coordinator's
    # certificate for its address, each agent's Predict certificate for its own address, and a one-time token per
    # device (before the coordinator's first start, as an operator may; test_fleet_e2e runs `devices enroll`)
    init_certificates(certs, [coordinator_host])
    for name in DEVICES:
        issue_certificate(certs, name, [net.address(name)], client=False)
    with Registry(state_dir=state) as registry:
        tokens = registry.enroll(list(DEVICES))

    def flwr(*args: str) -> dict:
        """The operator's `flwr` CLI on the coordinator's host (the SuperLink's control API is on its loopback)."""
        done = net.run("coordinator", [str(BIN / "flwr"), *args, "--format", "json"], env=flower_env(state),
                       capture_output=True, text=True, timeout=120)
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {}
        assert answer.get("success"), f"`flwr {' '.join(args)}` ({done.returncode}): {done.stdout}{done.stderr}"
        return answer

    logs = {host: tmp_path / f"{host}.log" for host in ("coordinator", *DEVICES)}
    processes = [spawn(net.command("coordinator", [
        str(BIN / "dress-fleet"), "coordinator", "start", "--host", coordinator_host,
        "--superlink-port", str(SUPERLINK_PORT), "--control-port", str(CONTROL_PORT), "--certs", str(certs),
        "--state-dir", str(state), "--rounds", str(ROUNDS), "--min-devices", str(len(DEVICES)), "--fraction", "1",
        "--width", "4", "--densities", "1,0.25", "--server-average", "0", "--max-examples", "32",
        "--eval-examples", "200", "--heartbeat-s", str(HEARTBEAT_S), "--round-timeout", str(ROUND_TIMEOUT_S)]),
        logs["coordinator"])]  # fmt: skip
    started = time.monotonic()
    strangers: list[subprocess.Popen] = []
    retired: list[psutil.Process] = []  # the descendants of the agent stopped to renew its key

    def alive() -> None:
        for (host, log), p in zip(logs.items(), processes, strict=True):
            assert p.poll() is None, f"{host} exited:\n{tail(log)}"

    def wait_for(what: str, condition: Callable[[], object], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            alive()
            assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s:\n" + "\n".join(
                f"--- {host}\n{tail(log, 3000)}" for host, log in logs.items())
            time.sleep(0.5)

    def join(i: int, name: str, cert: str) -> list[str]:
        """`dress-agent join` on the device's host, serving Predict at its address over mutual TLS with the
        certificate ``cert``; the enrollment token is added for the first start (a restart uses the stored
        credential)."""
        trace = tmp_path / f"{name}.csv"
        trace.write_text("t_s,latency_ms,memory_mb\n0,1000,100\n")  # every density fits: each serves 1.0
        return net.command(name, [
            str(BIN / "dress-agent"), "join", "--device", DEVICES[name],
            "--coordinator", control, "--superlink", superlink, "--ca", str(certs / "ca.pem"),
            "--serve-host", net.address(name), "--serve-port", str(PREDICT_PORT),
            "--predict-cert", str(certs / f"{cert}.pem"), "--predict-key", str(certs / f"{cert}.key"),
            "--partition-id", str(i), "--num-partitions", str(len(DEVICES)), "--budget-trace", str(trace),
            "--heartbeat-interval", str(AGENT_HEARTBEAT_S), "--connect-timeout", "180",
            "--calibration-repeats", "5", "--training-calibration-steps", "1",
            "--state-dir", str(tmp_path / name)])  # fmt: skip

    try:
        for i, name in enumerate(DEVICES):  # each reaches the coordinator over its bad link
            processes.append(spawn([*join(i, name, name), "--token", tokens[name]], logs[name]))
        agent = processes[1 + list(DEVICES).index(CUT)]
        wait_for("first round", lambda: recorded_rounds(state), 200)
        first_round_s = time.monotonic() - started
        before = len(recorded_rounds(state))
        supernode = supernodes(agent.pid)
        assert len(supernode) == 1, supernode
        renewed_supernode_log = tmp_path / RENEWED / "logs" / f"supernode-{RENEWED}.log"
        replies_before = renewed_supernode_log.read_text(errors="replace").count("Sent successfully")

        # Cut at the switch: the device's packets vanish and nothing tells it so; only timeouts do
        net.link(CUT, up=False)
        cut_at, cpu_before = time.monotonic(), tree_cpu_s(agent.pid)
        agent_log = logs[CUT].stat().st_size
        supernode_log = tmp_path / CUT / "logs" / f"supernode-{CUT}.log"
        supernode_log_size = supernode_log.stat().st_size

        def missed() -> list[RoundRecord]:
            return [r for r in recorded_rounds(state)[before:] if CUT not in r.details["participants"]]

        # Meanwhile, through the CLI: the operator's client certificate, RENEWED's new Predict certificate, and a
        # fleet's CA made as this one was; and on the operator's host strangers' SuperNodes at the SuperLink, one
        # with a key nobody registered and one with none (Flower's SuperNode authentication refuses both)
        client_cert = fleet_cli("certs", "issue", OPERATOR, "--client", "--dir", certs)
        renewed_cert = fleet_cli("certs", "issue", f"{RENEWED}-renewed", "--dir", certs, "--host",
                                 net.address(RENEWED))
        other_fleet = fleet_cli("certs", "init", "--dir", tmp_path / "other-certs", "--host", coordinator_host)
        supernode_key(tmp_path / "stranger")
        for port, (name, key) in enumerate((("stranger-keyed", ["--auth-supernode-private-key",
                                                                 str(tmp_path / "stranger" / "supernode.key")]),
                                            ("stranger-bare", [])), start=9094):
            strangers.append(spawn(net.command(OPERATOR, [
                str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.pem"), "--superlink", superlink,
                "--port", str(port), "--node-config", f'device-name="{RENEWED}"', *key]), tmp_path / f"{name}.log"))

        # The operator removes RENEWED's SuperNode key at the SuperLink, once RENEWED answered the round under way
        # (or it ended), and restarts the agent with its new certificate: told its key is retired, it makes a new
        # one and connects again.
        wait_for(f"{RENEWED}'s answer in round {before + 1}", lambda: missed() or renewed_supernode_log.read_text(
            errors="replace").count("Sent successfully") > replies_before, ROUND_TIMEOUT_S + 60)
        with Registry(state_dir=state) as registry:
            old_node = registry.supernode_of(RENEWED)[1]
        assert old_node is not None
        finished(renewed_cert)
        flwr("supernode", "unregister", str(old_node), "local")
        renewing = list(DEVICES).index(RENEWED)
        old = processes[1 + renewing]
        with contextlib.suppress(psutil.Error):
            retired = psutil.Process(old.pid).children(recursive=True)
        old.terminate()
        old.wait(timeout=60)
        assert old.returncode == 0, tail(logs[RENEWED])
        logs[RENEWED] = tmp_path / f"{RENEWED}-again.log"
        processes[1 + renewing] = spawn(join(renewing, RENEWED, f"{RENEWED}-renewed"), logs[RENEWED])

        # The operator asks an agent from its own host with the CLI a person uses: the fleet's client certificate,
        # nothing, or the CA alone (each a Python start, seconds here: the outage leaves the machine time for them)
        finished(client_cert)
        finished(other_fleet)
        assert names_of(tmp_path / "other-certs" / "server.pem") == names_of(certs / "server.pem"), "certs init"
        client = ["--ca", str(certs / "ca.pem"), "--cert", str(certs / f"{OPERATOR}.pem"),
                  "--key", str(certs / f"{OPERATOR}.key")]
        statuses = [(ok, subprocess.Popen(net.command(OPERATOR, [
            str(BIN / "dress-agent"), "status", "--agent", predict[ASKED], "--timeout", "5", *extra]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"}))
            for extra, ok in ((client, True), ([], False), (client[:2], False))]  # fmt: skip

        wait_for(f"round without {CUT}", lambda: missed() and time.monotonic() - cut_at >= OUTAGE_MIN_S,
                 OUTAGE_MIN_S + 2 * ROUND_TIMEOUT_S + 60)
        cpu_after, outage_s = tree_cpu_s(agent.pid), time.monotonic() - cut_at
        net.link(CUT, up=True)
        during = logs[CUT].read_bytes()[agent_log:].decode(errors="replace")  # offsets in bytes, not characters
        supernode_during = supernode_log.read_bytes()[supernode_log_size:].decode(errors="replace")
        last_missed = missed()[-1].round

        # Back without a restart: the same agent and SuperNode processes train a later round
        wait_for(f"round {CUT} trained after it came back", lambda: any(
            r.round > last_missed and CUT in r.details["participants"] for r in recorded_rounds(state)), 150)
        assert supernodes(agent.pid) == supernode
        # The operator lists the fleet, every device online again, from the coordinator's host (beside the last
        # rounds: a Python start is seconds here)
        listing = subprocess.Popen(
            net.command("coordinator", [str(BIN / "dress-fleet"), "devices", "--state-dir", str(state)]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
        wait_for("last round", lambda: len(recorded_rounds(state)) == ROUNDS, 150)

        def renewed_node() -> int | None:
            with Registry(state_dir=state) as registry:
                node = registry.supernode_of(RENEWED)[1]
            return node if node not in (None, old_node) else None

        wait_for(f"{RENEWED}'s new SuperNode key", renewed_node, 60)
        with Registry(state_dir=state) as registry:
            rounds = registry.list_rounds()
            devices = {d.name: d for d in registry.list_devices()}
            histories = {name: registry.device_history(d.id) for name, d in devices.items()}
        # Nothing lost: every round once, each published as a version of its own; every device's row
        assert [r.round for r in rounds] == list(range(1, ROUNDS + 1)), [r.round for r in rounds]
        assert [r.model_version for r in rounds] == [f"round-{r.round}" for r in rounds], rounds
        assert rounds[0].details["participants"] == dict.fromkeys(DEVICES, 1.0), rounds[0].details  # over bad links
        assert set(devices) == set(DEVICES)
        for r in rounds:  # a round goes on with whoever answered in time: never nobody; each through its SuperNode
            trained = r.details["participants"]
            assert trained and set(trained) <= set(DEVICES) and set(trained.values()) == {1.0}, r.details
            assert set(r.participants) == {devices[name].id for name in trained}, (r.participants, r.details)
        assert all(r.details["wall_s"] < ROUND_TIMEOUT_S + 60 for r in rounds), [r.details["wall_s"] for r in rounds]
        for name, d in devices.items():  # each device's density row, and the budget that set it
            assert (d.profile, d.status.value, d.current_density) == (DEVICES[name], "online", 1.0)
            assert d.last_budget is not None and d.last_budget.memory_mb == 100
            assert d.flower_node_id is not None  # its SuperNode key, registered at the SuperLink
            assert histories[name] and histories[name][-1].density == 1.0
        new_node = devices[RENEWED].flower_node_id
        assert new_node not in (None, old_node)
        assert "making a new one" in tail(logs[RENEWED], 100_000), tail(logs[RENEWED])

        # No hot loop while cut off: about idle on CPU, and each kind of failure said once, not per retry
        agent_cpu = cpu_after[agent.pid] - cpu_before[agent.pid]
        children_cpu = sum(cpu - cpu_before[pid] for pid, cpu in cpu_after.items() if pid in cpu_before
                           and pid != agent.pid)
        tries = supernode_during.count("Connection attempt failed")
        print(f"links {links}; round 1 after {first_round_s:.0f} s; {CUT} cut off {outage_s:.0f} s: CPU "
              f"{agent_cpu:.2f} s (agent), {children_cpu:.2f} s (its SuperNode and its children); SuperNode retries "
              f"{tries}; rounds (participants, wall s): "
              f"{[(r.round, sorted(r.details['participants']), round(r.details['wall_s'])) for r in rounds]}")
        assert agent_cpu < 0.1 * outage_s and children_cpu < 0.1 * outage_s, (agent_cpu, children_cpu, outage_s)
        assert 1 <= during.count("heartbeat failed") <= 3, during
        # Flower's SuperNode logs each reconnection try: its backoff (capped at 20 s) allows a handful a minute
        assert tries <= 3 + outage_s / 5, supernode_during

        # The operator's host, once every agent serves the last model: each address with the fleet's credentials
        # and without; beside it, the SuperLink's nodes from the coordinator's host
        credential = StoredCredential.load(tmp_path / RENEWED)
        assert credential is not None
        probe = subprocess.Popen(net.command(OPERATOR, [
            sys.executable, str(PROBE), "--certs", str(certs), "--control", control, "--superlink", superlink,
            "--model-version", rounds[-1].model_version, "--register-secret", credential.credential,
            *[f"--agent={name}={address}" for name, address in predict.items()]]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        nodes = {int(n["node-id"]): n.get("status") for n in flwr("supernode", "ls", "local")["nodes"]}
        probed, probe_errors = probe.communicate(timeout=150)
        listed = listing.communicate(timeout=120)[0]
        answers = [(ok, p.communicate(timeout=120)[0], p.returncode) for ok, p in statuses]
        assert probe.returncode == 0, probed + probe_errors
        seen = json.loads(probed.strip().splitlines()[-1])

        assert listing.returncode == 0, listed
        assert f"{len(DEVICES)} devices" in listed, listed
        for name, profile in DEVICES.items():
            row = next((line for line in listed.splitlines() if f" {name} " in line), None)
            assert row is not None and profile in row and "online" in row, listed

        # The SuperLink knows the devices' keys alone: no stranger got a node, and RENEWED's new one is connected
        assert set(nodes) - {old_node} == {d.flower_node_id for d in devices.values()}, nodes
        assert nodes[new_node] == "online", nodes
        for name in ("stranger-keyed", "stranger-bare"):  # Flower's own refusal, in each stranger's log
            log = tail(tmp_path / f"{name}.log", 100_000)
            assert "could not establish a connection to the SuperLink" in log, log[-2000:]

        # Reachable with the fleet's credentials, refused without: the control plane answers the CA's TLS but
        # not a caller without a credential, nor plaintext, nor a device offering no or a malformed SuperNode key;
        # nginx answers HTTPS, and plain HTTP with 400.
        bad_keys = seen["control_plane"].pop("bad_keys")
        assert seen["control_plane"] == {"tls_health": "SERVING", "no_credential": "UNAUTHENTICATED",
                                         "plaintext": "UNAVAILABLE"}, seen
        for key, message in (("", "OpenSSH line"), ("ssh-rsa AAAA", "not an OpenSSH public key")):
            code, details = bad_keys[key]
            assert code == "INVALID_ARGUMENT" and "this fleet authenticates SuperNodes" in details, bad_keys
            assert message in details, bad_keys
        assert seen["superlink"] == {"https_health": 200, "plain_http_health": 400}, seen
        assert set(seen["agents"]) == set(DEVICES), seen
        for name, answer in seen["agents"].items():  # Predict over mutual TLS only, with the last model
            assert answer == {"name": name, "profile": DEVICES[name], "density": 1.0,
                              "model_version": rounds[-1].model_version, "predict_density": 1.0,
                              "predict_shape": [1, 10], "no_client_cert": "UNAVAILABLE",
                              "plaintext": "UNAVAILABLE"}, seen
        for ok, out, code in answers:  # the CLI a person uses: the fleet's client certificate, or no answer
            assert (code == 0) == ok and (f"{ASKED} ({DEVICES[ASKED]})" in out) == ok, out
        # Each SuperNode reached the SuperLink from its own host's address (nginx logs the peer's)
        peers = {line.split()[0] for line in (state / "logs" / "proxy-access.log").read_text().splitlines()}
        assert {net.address(name) for name in DEVICES} <= peers, peers

    finally:
        descendants = stop_all(processes + strangers)
    assert processes[0].returncode == 0, tail(logs["coordinator"])
    _, left = psutil.wait_procs(descendants + retired, timeout=10)
    assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
