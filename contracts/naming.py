"""Device names: what a device is called in the registry, in Flower's node-config and under --state-dir."""

from __future__ import annotations

import re
import socket

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it also names files under --state-dir
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(name: str) -> str:
    """The name itself, or ValueError saying what a device name may hold."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"a device name must be {NAME_RULE}, got {name!r}")
    return name


def default_name(profile: str) -> str:
    """<hostname>-<profile>: stable across restarts, so re-registering keeps the device's id and history."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "device"
    return f"{host}-{profile}"


def simulated_name(partition_id: int) -> str:
    """The name of Flower's virtual node with this partition-id: the fleet driver registers it, the ClientApp
    reports it, and the two must agree."""
    return f"sim-{partition_id:03d}"
