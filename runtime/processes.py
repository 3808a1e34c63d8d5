"""Driving Flower's own engine as real processes: SuperLink, SuperNodes and `flwr run`.

Flower has no public in-process SuperLink; its CLI spawns processes and talks to them over HTTP, and so do
we. Every process gets a FLWR_HOME inside our state directory, telemetry and update checks off, and
``--disable-runtime-dependency-installation`` (otherwise a run builds a venv and downloads a CUDA torch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil

from runtime.certificates import FleetCertificates, https_context

log = logging.getLogger(__name__)


def pick_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now on ``host`` (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PortInUseError(RuntimeError):
    """A port one of our processes must listen on is held by something else."""


def require_free_port(host: str, port: int, what: str, wait_s: float = 0.0) -> None:
    """Refuse to start ``what`` on a port something already listens on, after waiting up to ``wait_s`` for it
    to be let go (a killed predecessor's tree is ended by its reaper within seconds).

    A health check alone would be answered by whatever holds the port (an old SuperLink left running), and
    the new process would fail to bind behind it unnoticed. PortInUseError names the holder where it can. Only
    a listener counts: connections a killed predecessor left in TIME_WAIT do not stop a server that binds with
    SO_REUSEADDR, as Flower's, gRPC's and nginx's do, so neither do they stop a restart here."""
    deadline, waited = time.monotonic() + wait_s, False
    while (reason := _bind_error(host, port)) is not None:
        if time.monotonic() >= deadline:
            raise PortInUseError(f"cannot start the {what} on {host}:{port}: {reason}{_listener(port)}; stop what "
                                 "holds it or choose another port")
        if not waited:  # the holder is looked up (a scan of every socket) only to be reported
            log.warning("the %s's port %s:%d is held%s; waiting up to %.0f s for it", what, host, port,
                        _listener(port), wait_s)
            waited = True
        time.sleep(1.0)


def _bind_error(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError as e:
            return e.strerror or str(e)


def _listener(port: int) -> str:
    """Who listens on ``port``, in words, where the system says."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" (held by pid {conn.pid}, {' '.join(psutil.Process(conn.pid).cmdline()[:3])})"
    return ""


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def flower_env(state_dir: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec etc. must be on PATH
    return {
        **os.environ,
        "FLWR_HOME": str((state_dir / "flwr").resolve()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def write_connection(state_dir: Path, name: str, address: str, root_ca: Path | None = None) -> None:
    """The `flwr` CLI's connection to our SuperLink: verified against the fleet CA, or plaintext on loopback."""
    home = state_dir / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    security = (f"root-certificates = {toml_value(str(root_ca.resolve()))}\n" if root_ca else "insecure = true\n")
    (home / "config.toml").write_text(f'[superlink.{name}]\naddress = "{address}"\n{security}')


def local_host(host: str) -> str:
    """The address a process on this machine reaches a listener bound to ``host`` by."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host


SIMULATED_FLEET_NICENESS = 10
"""CPU priority of a simulation's SuperLink and everything it spawns (Ray workers training the virtual devices).

In a real fleet the devices' training runs on the devices; simulated on one machine it would otherwise take the
CPU from the control plane and the registry, and heartbeats would fall behind for a reason no deployment has."""


RAY_ADDRESS = "RAY_ADDRESS"  # the cluster `ray.init()` joins (Ray's own variable); unset: it starts a Ray of its own

REAPER = Path(__file__).with_name("reaper.py")
PREDECESSOR_WAIT_S = 30.0  # a restarted device waits this long for its killed predecessor's SuperNode to go


class ManagedProcess:
    """A child process in its own process group, so stopping it also stops what it spawned.

    It dies with us, and so does everything it spawns: the command runs under ``runtime/reaper.py``, which the
    kernel sends SIGTERM if this process is killed (even by kill -9), and which then ends the whole tree below
    it — the SuperLink or SuperNode, and Flower's simulation and Ray, which leave for sessions of their own —
    instead of letting them train and publish on as a headless fleet. Start it from a thread that lives as long
    as it should (the main thread): the kernel's signal follows the thread that started the process."""

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str], log_path: Path,
                 niceness: int = 0) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")
        # ends the whole tree with us (runtime/reaper.py)
        cmd = [sys.executable, str(REAPER), "--parent-pid", str(os.getpid()), "--", *cmd]
        if niceness and (nice := shutil.which("nice")):  # children inherit it; nice execs, so the pid is the same
            cmd = [nice, "-n", str(niceness), *cmd]
        log.info("starting %s: %s", name, " ".join(cmd))
        self.proc = subprocess.Popen(
            list(cmd), env=dict(env), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process and all it spawned, wait, then SIGKILL what is left.

        "All it spawned" is its own group and every descendant outside it: SuperExec starts flwr-simulation (and
        with it Ray) in a session of its own, which a signal to the group alone never reaches."""
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        descendants = _descendants(self.proc.pid)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            for p in descendants:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader so it does not keep the group alive as a zombie
                if not _group_alive(pgid) and not any(map(_running, descendants)):
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.poll()
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_on_sigterm() -> None:
    """Make SIGTERM (a service manager's stop, `kill`) end this process as Ctrl-C does: by KeyboardInterrupt, so
    every ``finally`` runs and the SuperLink, Ray and the rest are stopped, not left behind. Main thread only."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_superlink(state_dir: Path, host: str, port: int, simulation: bool = False,
                    certs: FleetCertificates | None = None, ray_address: str | None = None) -> ManagedProcess:
    """Flower's SuperLink on host:port: HTTPS with the fleet's certificates, or plaintext without them.

    With certificates it also admits only SuperNodes whose public keys were registered (Flower's
    ``--enable-supernode-auth``, which needs TLS): the coordinator registers each device's key at enrollment.

    ``simulation``: its SuperExec starts ``flwr-simulation``, whose Ray backend calls ``ray.init()``: with
    ``ray_address`` that joins the existing cluster there, by RAY_ADDRESS in this process's environment alone
    (SuperExec and ``flwr-simulation`` inherit it), and without one it starts a Ray for the run, whatever
    RAY_ADDRESS our own environment may hold."""
    require_free_port(host, port, "SuperLink")
    security = (["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert),
                 "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"] if certs else ["--insecure"])
    cmd = [
        str(Path(sys.executable).parent / "flower-superlink"),
        *security,
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
        "--database", str((state_dir / "superlink.db").resolve()),
    ]  # fmt: skip
    env = flower_env(state_dir)
    if simulation:
        cmd.append("--simulation")
        env.pop(RAY_ADDRESS, None)
        if ray_address:
            env[RAY_ADDRESS] = ray_address
    proc = ManagedProcess("superlink", cmd, env, state_dir / "logs" / "superlink.log",
                          niceness=SIMULATED_FLEET_NICENESS if simulation else 0)
    here = local_host(host)
    wait_healthy(proc, f"{'https' if certs else 'http'}://{here}:{port}/health",
                 https_context(certs.ca) if certs else None)
    write_connection(state_dir, "local", f"{here}:{port}", certs.ca if certs else None)
    return proc


def start_supernode(
    state_dir: Path, superlink: str, port: int, node_config: Mapping[str, object], name: str,
    root_ca: Path | None = None, auth_key: Path | None = None,
) -> ManagedProcess:
    """A SuperNode that verifies the SuperLink against ``root_ca``, or talks plaintext without one; with
    ``auth_key`` (TLS only) it proves itself with that private key, which its coordinator registered."""
    require_free_port("127.0.0.1", port, f"SuperNode {name}", wait_s=PREDECESSOR_WAIT_S)
    config = " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())
    security = ["--root-certificates", str(root_ca.resolve())] if root_ca else ["--insecure"]
    if root_ca and auth_key:
        security += ["--auth-supernode-private-key", str(auth_key.resolve())]
    cmd = [
        str(Path(sys.executable).parent / "flower-supernode"),
        *security,
        "--superlink", superlink,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--node-config", config,
    ]  # fmt: skip
    return ManagedProcess(name, cmd, flower_env(state_dir), state_dir / "logs" / f"{name}.log")


def wait_healthy(proc: ManagedProcess, url: str, context: ssl.SSLContext | None = None,
                 timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    proc.stop()
    raise TimeoutError(f"{proc.name} did not answer {url} within {timeout:.0f} s:\n{proc.tail()}")


def flwr(state_dir: Path, *args: str, timeout: float = 120.0) -> dict:
    """Run a `flwr` CLI command with --format json and return its JSON answer."""
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    done = subprocess.run(cmd, env=flower_env(state_dir), capture_output=True, text=True, timeout=timeout)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {done.stdout}{done.stderr}") from None
    if not answer.get("success", True):
        raise RuntimeError(f"`flwr {' '.join(args)}` failed: {answer.get('error-message', answer)}")
    return answer


def register_supernode(state_dir: Path, public_key: str, name: str) -> int:
    """Register a SuperNode's public key (OpenSSH) with our SuperLink (`flwr supernode register`); its node id."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "supernode.pub"
        path.write_text(public_key + "\n")
        return int(flwr(state_dir, "supernode", "register", str(path), "local", "--name", name)["node-id"])


def supernode_status(state_dir: Path, node_id: int) -> str | None:
    """What our SuperLink says of a node (`flwr supernode ls`): 'registered', 'online', 'offline',
    'unregistered', ...; None when it does not know the node (a new SuperLink database)."""
    for node in flwr(state_dir, "supernode", "ls", "local").get("nodes", []):
        if str(node.get("node-id")) == str(node_id):
            return str(node.get("status"))
    return None


def unregister_supernode(state_dir: Path, node_id: int) -> None:
    """Remove a SuperNode's key from our SuperLink: it can no longer connect (a re-enrolled device's old key)."""
    flwr(state_dir, "supernode", "unregister", str(node_id), "local")


def submit_run(
    state_dir: Path,
    app_dir: Path,
    run_config: Mapping[str, object],
    federation_config: Mapping[str, object] | None = None,
) -> int:
    args = ["run", str(app_dir), "local"]
    if run_config:
        args += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
    return int(flwr(state_dir, *args)["run-id"])


def run_status(state_dir: Path, run_id: int) -> str:
    """The run's status string as `flwr ls` reports it (e.g. 'pending', 'running', 'finished:completed')."""
    answer = flwr(state_dir, "ls", "local", "--run-id", str(run_id))
    runs = answer.get("runs", [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"
