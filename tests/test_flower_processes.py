"""Managed child processes: their own process group, their priority, and a stop that takes what they spawned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from contracts.flower_processes import ManagedProcess

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
from contracts.flower_processes import ManagedProcess, stop_on_sigterm
stop_on_sigterm()
proc = ManagedProcess("spawner", [sys.executable, "-c", {SPAWNS_A_CHILD!r}], os.environ, Path(sys.argv[1]))
try:
    print(proc.proc.pid, flush=True)
    time.sleep(60)
finally:
    proc.stop(timeout=5)
"""


def test_a_terminated_owner_stops_what_it_started(tmp_path: Path) -> None:
    """`kill` of a coordinator, a simulation or a benchmark (SIGTERM) must not leave its SuperLink and Ray behind."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "log")], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    managed = psutil.Process(int(owner.stdout.readline()))
    tree: list[psutil.Process] = []
    for _ in range(100):
        tree = managed.children(recursive=True)
        if tree:
            break
        time.sleep(0.05)
    assert tree, "the managed process did not start its child"
    owner.terminate()
    assert owner.wait(timeout=20) != 0
    assert not _running(managed) and not any(map(_running, tree))
