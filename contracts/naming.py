"""Device names: what a device is called in the registry, in Flower's node-config and under --state-dir."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it also names files under --state-dir
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(name: str) -> str:
    """The name itself, or ValueError saying what a device name may hold."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"a device name must be {NAME_RULE}, got {name!r}")
    return name


def simulated_name(partition_id: int) -> str:
    """The name of Flower's virtual node with this partition-id: the fleet driver registers it, the ClientApp
    reports it, and the two must agree."""
    return f"sim-{partition_id:03d}"
