"""Flower SuperNode authentication, kept in step with enrollment: which public keys the SuperLink admits.

A TLS fleet's SuperLink runs with ``--enable-supernode-auth``: only SuperNodes whose public keys were registered
connect. The coordinator registers a device's key when the device registers with the control plane (so only an
enrolled device's SuperNode can connect), records the node id Flower gave it, and unregisters a replaced key. The
ServerApp then knows which device a node is by that record, never by what the node says about itself.

Only the coordinator registers and unregisters keys: the SuperLink's Control API, where `flwr supernode register`
lands, answers on loopback only (coordinator/fleet_proxy.py). A key the SuperLink removed (an operator's
`flwr supernode unregister`, or a registration undone) stays retired there: Flower refuses to register it again,
so the device is told to make a new key pair (KeyRetiredError) rather than being locked out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from contracts.credentials import digest
from coordinator.registry import Registry
from runtime.processes import register_supernode, supernode_status, unregister_supernode

log = logging.getLogger(__name__)

ADMITTED = ("registered", "online", "offline")  # node states whose key still connects


class KeyRetiredError(RuntimeError):
    """The SuperLink holds this public key as removed (or as another node's): it can never be registered again."""


@dataclass(frozen=True)
class KeyChange:
    """A key registered with the SuperLink for a device, not yet recorded in the registry."""

    key_sha256: str
    node_id: int
    replaces: int | None  # the node id of the device's previous key, unregistered once the new one is recorded


class SupernodeKeys:
    """Registers devices' SuperNode keys with the SuperLink under ``state_dir`` (via the `flwr` CLI)."""

    def __init__(self, registry: Registry, state_dir: Path) -> None:
        self._registry = registry
        self._state_dir = state_dir
        self._lock = threading.Lock()  # one registration at a time: two for one device would leave an orphan key

    def prepare(self, name: str, public_key: str) -> KeyChange | None:
        """Register ``public_key`` for device ``name`` unless it is its key and the SuperLink still admits it
        (then None); a device whose key was removed at the SuperLink registers again after a restart.

        KeyRetiredError when the SuperLink will not take this key again; RuntimeError when it refuses it else."""
        key_sha256 = digest(public_key)
        with self._lock:
            current, node_id = self._registry.supernode_of(name)
            if current == key_sha256 and node_id is not None:
                status = supernode_status(self._state_dir, node_id)
                if status in ADMITTED:
                    return None
                if status is not None:
                    raise KeyRetiredError(f"the SuperLink removed this SuperNode key (node {node_id} is {status})")
                node_id = None  # a new SuperLink database: the key is registered afresh
            try:
                new = register_supernode(self._state_dir, public_key, name)
            except RuntimeError as e:
                if "already in use" in str(e):  # Flower's answer for a key it holds, removed or another node's
                    raise KeyRetiredError("the SuperLink holds this SuperNode key already") from e
                raise
        log.info("registered the SuperNode key of %s as Flower node %d", name, new)
        return KeyChange(key_sha256, new, node_id if current is not None else None)

    def commit(self, change: KeyChange) -> None:
        """The change is recorded: the replaced key can no longer connect."""
        if change.replaces is not None:
            self._forget(change.replaces)

    def abort(self, change: KeyChange) -> None:
        """The registration it was for failed: the new key must not connect either."""
        self._forget(change.node_id)

    def _forget(self, node_id: int) -> None:
        try:
            unregister_supernode(self._state_dir, node_id)
        except RuntimeError as e:  # already gone, or the SuperLink is down: nothing more to do than say so
            log.warning("could not unregister SuperNode %d: %s", node_id, e)
