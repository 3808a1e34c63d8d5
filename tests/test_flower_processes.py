"""Managed child processes: their own process group, their priority, and a stop that takes what they spawned."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from contracts.flower_processes import ManagedProcess

SPAWNS_A_CHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"


def test_niceness_reaches_what_the_process_spawns_and_stop_takes_the_whole_group(tmp_path: Path) -> None:
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
