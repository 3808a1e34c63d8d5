"""Hosts on a private network, made of Linux network namespaces: each host a namespace with its own address, all
joined by a bridge in one more namespace, so nothing of ours touches the machine's own interfaces and every
address exists only inside namespaces made here. Needs root (CAP_NET_ADMIN) and iproute2.

    with hosts("coord", "stranger") as net:
        net.run("stranger", ["curl", ...])        # a command on that host
        net.address("coord")                      # its address, e.g. 10.231.0.1
        net.impair("stranger", delay_ms=40, jitter_ms=10, loss_pct=5)   # a bad link (netem)
        net.link("stranger", up=False)            # its cable pulled at the switch; up=True plugs it back
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from benchmarks.netem_queue import Impairment

SUBNET = "10.231.0"  # private, and only ever inside the namespaces below
NETEM_QUEUE = Path(__file__).with_name("netem_queue.py")
QUEUE = 0  # the netfilter queue number in a host's namespace (each namespace has its own queues)


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def impairment_unavailable() -> str | None:
    """Why links cannot be impaired here (``Network.impair``), or None. Either the kernel has netem (``tc``), or
    its user-space stand-in needs iptables' NFQUEUE target and the NetfilterQueue package."""
    if reason := unavailable():
        return reason
    if _has_netem():
        return None
    return _stand_in_missing()


def _stand_in_missing() -> str | None:
    """What netem's user-space stand-in (``benchmarks/netem_queue.py``) lacks here, or None."""
    missing = []
    if shutil.which("iptables") is None:
        missing.append("iptables (Debian: apt-get install iptables)")
    try:  # the stand-in runs on this interpreter
        importlib.import_module("netfilterqueue")
    except ImportError as e:
        missing.append(f"the NetfilterQueue package ({e}; pip install 'NetfilterQueue>=1.1,<2', which builds "
                       "against Debian's libnetfilter-queue-dev)")
    if not missing:
        return None
    return f"this kernel has no netem (tc qdisc netem), and its user-space stand-in needs {' and '.join(missing)}"


@dataclass(frozen=True)
class Network:
    namespaces: Mapping[str, str]  # host -> namespace name
    addresses: Mapping[str, str]  # host -> IPv4 address
    switch: str = ""  # the bridge's namespace
    ports: Mapping[str, str] = field(default_factory=dict)  # host -> its link's bridge-side veth (in ``switch``)
    _emulators: dict[str, subprocess.Popen] = field(default_factory=dict, compare=False, repr=False)

    def address(self, host: str) -> str:
        return self.addresses[host]

    def command(self, host: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run on ``host`` (inside its namespace)."""
        return ["ip", "netns", "exec", self.namespaces[host], *cmd]

    def run(self, host: str, cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd), **kwargs)  # type: ignore[call-overload]

    def impair(self, host: str, delay_ms: float = 0.0, jitter_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Make ``host``'s link bad: each packet crossing it, either way, is delayed ``delay_ms`` ± ``jitter_ms``
        (uniform; a later packet may overtake an earlier one) and lost with ``loss_pct`` % probability, so a round
        trip takes about twice the delay. All zero: a clean link again. Replaces whatever was set before.

        Both directions, because netem shapes only what leaves an interface: the host's own end delays what it
        sends, the bridge-side end what it receives. Where the kernel has netem that is ``tc qdisc replace ...
        netem`` on both ends; where it was built without (``tc``: "Specified qdisc kind is unknown"), iptables
        hands the host's packets, in and out, to ``benchmarks/netem_queue.py`` running in its namespace, which
        does the same in user space. RuntimeError when neither works here."""
        impairment = Impairment(delay_ms, jitter_ms, loss_pct)
        if _has_netem():
            for ns, dev in ((self.namespaces[host], "eth0"), (self.switch, self.ports[host])):
                if impairment.none:
                    subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                else:
                    _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem",
                          "delay", f"{delay_ms:g}ms", f"{jitter_ms:g}ms", "loss", f"{loss_pct:g}%"])
            return
        self._stop_emulator(host)
        if impairment.none:
            return
        if reason := _stand_in_missing():
            raise RuntimeError(reason)
        for chain, direction in (("OUTPUT", "-o"), ("INPUT", "-i")):  # --queue-bypass: pass while none listens
            rule = [chain, direction, "eth0", "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"]
            if subprocess.run(self.command(host, ["iptables", "-w", "-C", *rule]), capture_output=True).returncode:
                _run(self.command(host, ["iptables", "-w", "-I", *rule]))
        emulator = subprocess.Popen(self.command(host, [
            sys.executable, str(NETEM_QUEUE), "--queue", str(QUEUE), "--delay-ms", str(delay_ms),
            "--jitter-ms", str(jitter_ms), "--loss", str(loss_pct)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        if emulator.stdout is None or emulator.stdout.readline().strip() != "ready":
            emulator.kill()
            raise RuntimeError(f"netem's user-space stand-in did not start on {host}: {emulator.communicate()[1]}")
        self._emulators[host] = emulator

    def impairment_backend(self) -> str:
        """What ``impair`` uses here: "netem" (the kernel's) or "nfqueue" (``benchmarks/netem_queue.py``)."""
        return "netem" if _has_netem() else "nfqueue"

    def link(self, host: str, up: bool, at: Literal["switch", "host"] = "switch") -> None:
        """Cut ``host`` off the network (``up=False``) or plug it back in (``up=True``).

        ``at="switch"`` takes the bridge-side end of its link down: the host's interface loses its carrier but
        keeps its address and routes, so what it sends vanishes and nothing answers — what a device sees when
        the switch port, the access point or the uplink fails, and the case where only timeouts tell. ``"host"``
        takes the host's own interface down: its kernel knows, the subnet's route goes, and every connection
        attempt fails at once with "Network is unreachable" (the fastest failure a retry loop can meet)."""
        ns, dev = (self.switch, self.ports[host]) if at == "switch" else (self.namespaces[host], "eth0")
        _ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def close(self) -> None:
        """Stop the user-space link emulators (before the namespaces they run in are removed)."""
        for host in list(self._emulators):
            self._stop_emulator(host)

    def _stop_emulator(self, host: str) -> None:
        emulator = self._emulators.pop(host, None)
        if emulator is not None:
            emulator.terminate()
            try:
                emulator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                emulator.kill()
                emulator.wait()


@functools.cache
def _has_netem() -> bool:
    """Whether this kernel has netem: tried once per process, on the loopback of a namespace made for it."""
    probe = f"df-{uuid.uuid4().hex[:6]}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    try:
        return made and shutil.which("tc") is not None and subprocess.run(
            ["tc", "-n", probe, "qdisc", "replace", "dev", "lo", "root", "netem", "delay", "0ms"],
            capture_output=True).returncode == 0
    finally:
        if made:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def hosts(*names: str) -> Iterator[Network]:
    """A namespace per host on one bridge; all removed on exit (their processes should be stopped first)."""
    if reason := unavailable():
        raise RuntimeError(f"cannot make network namespaces: {reason}")
    tag = uuid.uuid4().hex[:6]
    switch = f"df-{tag}-sw"
    namespaces = {name: f"df-{tag}-{i}" for i, name in enumerate(names)}
    addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
    made: list[str] = []
    network: Network | None = None
    try:
        for ns in (switch, *namespaces.values()):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(namespaces.items()):
            # made in the host's namespace, one end moved to the switch: nothing appears in the machine's own
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{addresses[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        network = Network(namespaces, addresses, switch, {name: f"p{i}" for i, name in enumerate(names)})
        yield network
    finally:
        if network is not None:
            network.close()
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
