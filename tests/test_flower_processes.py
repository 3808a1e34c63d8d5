"""Managed child processes: their own process group, their priority, and a stop that takes what they spawned."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runtime.processes import ManagedProcess, PortInUseError, require_free_port, start_superlink

# The child leaves for a session of its own, as SuperExec's flwr-simulation does: a signal to the group misses it.
SPAWNS_A_CHILD = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
                  "start_new_session=True); time.sleep(60)")


def test_niceness_reaches_what_the_process_spawns_and_stop_takes_every_descendant(tmp_path: Path) -> None:
    proc = ManagedProcess("spawner", [sys.executable, "-c", SPAWNS_A_CHILD], os.environ, tmp_path / "log", niceness=7)
    try:
        parent = psutil.Process(proc.proc.pid)
        children = []
        for _ in range(100):
            children = parent.children()
            if children:
                break
            time.sleep(0.05)
        assert children, "the managed process did not start its child"
        base = psutil.Process().nice()
        assert parent.nice() == min(base + 7, 19) and children[0].nice() == min(base + 7, 19)
    finally:
        proc.stop(timeout=5)
    assert not proc.alive() and not _running(children[0])


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


OWNER = f"""
import os, sys, time
from pathlib import Path
from runtime.processes import ManagedProcess, stop_on_sigterm
stop_on_sigterm()
proc = ManagedProcess("spawner", [sys.executable, "-c", {SPAWNS_A_CHILD!r}], os.environ, Path(sys.argv[1]))
try:
    print(proc.proc.pid, flush=True)
    time.sleep(60)
finally:
    proc.stop(timeout=5)
"""


def _owner_of_a_tree(tmp_path: Path) -> tuple[subprocess.Popen, psutil.Process, list[psutil.Process]]:
    """A process owning a ManagedProcess whose command started a child in a session of its own."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "log")], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    managed = psutil.Process(int(owner.stdout.readline()))
    tree: list[psutil.Process] = []
    for _ in range(100):
        tree = managed.children(recursive=True)
        if len(tree) >= 2:  # the command and its child
            break
        time.sleep(0.05)
    assert len(tree) >= 2, "the managed process did not start its child"
    return owner, managed, tree


def _gone(managed: psutil.Process, tree: list[psutil.Process]) -> bool:
    deadline = time.monotonic() + 20
    while (_running(managed) or any(map(_running, tree))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(managed) and not any(map(_running, tree))


def test_a_terminated_owner_stops_what_it_started(tmp_path: Path) -> None:
    """`kill` of a coordinator, a simulation or a benchmark (SIGTERM) must not leave its SuperLink and Ray behind."""
    owner, managed, tree = _owner_of_a_tree(tmp_path)
    owner.terminate()
    assert owner.wait(timeout=20) != 0
    assert _gone(managed, tree)


def test_a_killed_owner_takes_its_managed_process_along(tmp_path: Path) -> None:
    """kill -9 of a coordinator or an agent runs no ``finally``: the kernel tells the reaper, which ends the tree."""
    owner, managed, tree = _owner_of_a_tree(tmp_path)
    owner.kill()
    owner.wait(timeout=20)
    assert _gone(managed, tree)


def test_a_port_held_by_another_process_is_refused_with_its_holder(tmp_path: Path) -> None:
    """An old SuperLink left running would answer the new one's health check: starting must fail instead."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"SuperLink on 127.0.0.1:{port}.*held by pid {os.getpid()}"):
            start_superlink(tmp_path, "127.0.0.1", port)
    require_free_port("127.0.0.1", port, "SuperLink")  # released: free again


def test_a_port_left_in_time_wait_is_free_for_a_restart() -> None:
    """A process killed with kill -9 leaves its connections in TIME_WAIT for a minute; its successor binds with
    SO_REUSEADDR (as Flower's servers do), so the port is free to it at once."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the killed predecessor's server did
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        client.close()
    states = {c.status for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port}
    assert psutil.CONN_TIME_WAIT in states, states
    require_free_port("127.0.0.1", port, "SuperNode")
