"""Run one command so that it, and everything it ever spawns, ends when we end or our starter dies.

    python reaper.py --parent-pid PID -- flower-superlink --insecure ...

Flower's processes do not all die with their parent: killed with kill -9, a coordinator's SuperLink got
SIGTERM from the kernel and went, but ``flwr-simulation``, started by the
SuperLink's SuperExec in a session of its own, carried on with Ray and the virtual fleet, orphaned to init.
This process sits between: it is a *child subreaper* (Linux), so whatever its descendants orphan is re-parented
to it rather than to init; it asks the kernel for SIGTERM when its starter dies (PR_SET_PDEATHSIG: set here,
not between fork and exec in the starter, where a process running gRPC must not run Python); and on SIGTERM or
SIGINT, or when the command exits, it terminates every remaining descendant, waits, and SIGKILLs what is left.

Standard library and psutil only: it starts before, and must not depend on, anything of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0  # between SIGTERM and SIGKILL for what is left


def _reap() -> dict[int, int]:
    """Collect every exited child (orphans included): pid -> exit code."""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = os.waitstatus_to_exitcode(status)


def _end_descendants() -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        tree = psutil.Process().children(recursive=True)
        if not tree:
            return
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and psutil.Process().children(recursive=True):
            _reap()
            time.sleep(0.1)
    _reap()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--parent-pid" or not argv[1].isdigit() or argv[2] != "--":
        print("usage: reaper.py --parent-pid PID -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError, AttributeError):
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))  # the kernel tells us when our starter dies, even by kill -9
    if os.getppid() != int(argv[1]):  # it died before we asked: nobody would tell us
        return 1
    argv = argv[2:]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    child = os.posix_spawnp(argv[1], argv[1:], os.environ)
    code = 0
    while not stopping:
        exited = _reap()
        if child in exited:
            code = exited[child]
            break
        time.sleep(0.2)
    _end_descendants()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
