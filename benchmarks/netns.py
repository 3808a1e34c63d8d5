"""Hosts on a private network, made of Linux network namespaces: each host a namespace with its own address, all
joined by a bridge in one more namespace, so nothing of ours touches the machine's own interfaces and every
address exists only inside namespaces made here. Needs root (CAP_NET_ADMIN) and iproute2.

    with hosts("coord", "stranger") as net:
        net.run("stranger", ["curl", ...])        # a command on that host
        net.address("coord")                      # its address, e.g. 10.231.0.1
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

SUBNET = "10.231.0"  # private, and only ever inside the namespaces below


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@dataclass(frozen=True)
class Network:
    namespaces: Mapping[str, str]  # host -> namespace name
    addresses: Mapping[str, str]  # host -> IPv4 address

    def address(self, host: str) -> str:
        return self.addresses[host]

    def command(self, host: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run on ``host`` (inside its namespace)."""
        return ["ip", "netns", "exec", self.namespaces[host], *cmd]

    def run(self, host: str, cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd), **kwargs)  # type: ignore[call-overload]


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
        yield Network(namespaces, addresses)
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
