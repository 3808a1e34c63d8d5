"""Which device each Flower node is, and who trains a round: the fleet's membership as the strategy sees it.

A Flower node id says nothing about the device behind it. With SuperNode authentication the node holds the key
the coordinator registered for a device at enrollment (the registry knows which); on a plaintext loopback fleet
the node answers a status query with its device's name. The draw of a round's devices depends on the seed, the
round and who is online, never on the method or on Flower's node ids, so every method on the same fleet trains
the same devices in the same rounds (paired comparisons).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from contracts.messages import STATUS_QUERY, device_of
from coordinator.registry.models import DeviceStatus
from coordinator.registry.records import DeviceInfo
from coordinator.registry.repository import Registry

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 120  # how long a batch of status queries waits for its answers


class Membership:
    """Flower node id -> device name, learnt lazily and kept for the run."""

    def __init__(self, registry: Registry, node_auth: bool = False) -> None:
        self.registry = registry
        self.node_auth = node_auth  # nodes are known by their registered keys (the registry), not by their word
        self.node_devices: dict[int, str] = {}

    def identify(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Which device each node is: with SuperNode authentication, the one whose registered key the node holds
        (what the coordinator recorded when it registered the key); otherwise what the node answers a status
        query, which is the device's word (plaintext fleets are loopback-only)."""
        unknown = [n for n in node_ids if n not in self.node_devices]
        if not unknown:
            return
        if self.node_auth:
            keyed = {d.flower_node_id: d.name for d in self.registry.list_devices() if d.flower_node_id is not None}
            self.node_devices.update({n: keyed[n] for n in unknown if n in keyed})
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type=STATUS_QUERY) for n in unknown]
        learnt = {}
        for reply in grid.send_and_receive(queries, timeout=STATUS_TIMEOUT_S):
            if reply.has_error():
                log.warning("node %s did not answer the status query: %s", reply.metadata.src_node_id, reply.error)
                continue
            try:
                learnt[device_of(reply)] = reply.metadata.src_node_id
            except ValueError as e:
                log.warning("node %s: %s", reply.metadata.src_node_id, e)
        self.node_devices.update({node: name for name, node in learnt.items()})
        self.registry.bind_flower_nodes(learnt)

    def sample(self, grid: Grid, devices: dict[str, DeviceInfo], count: int, rng: random.Random,
               density_of: Callable[[DeviceInfo], float | None]) -> list[tuple[int, DeviceInfo, float]]:
        """``count`` online devices drawn uniformly by name, with the node each one is connected as and the
        density ``density_of`` gives it; a drawn device with none (None) or not connected sits the round out.
        Nodes are identified lazily: only until every drawn device's node is known."""
        online = sorted(name for name, info in devices.items() if info.status == DeviceStatus.ONLINE)
        drawn = rng.sample(online, min(count, len(online)))
        nodes = self.nodes_of(grid, set(drawn), rng)
        chosen: list[tuple[int, DeviceInfo, float]] = []
        for name in drawn:
            density = density_of(devices[name])
            if name in nodes and density is not None:
                chosen.append((nodes[name], devices[name], density))
        return chosen

    def nodes_of(self, grid: Grid, names: set[str], rng: random.Random) -> dict[str, int]:
        """The connected node of each named device that has one: the unknown nodes are asked who they are, a
        batch at a time in a random order, until every named device is found or none is left to ask.

        A batch is twice the devices still missing, and at least twice the last batch: finding the last few of
        100 devices among 10,000 unknown nodes means asking most of them, and in batches that shrank with the
        missing count that took hundreds of round trips (~300 s in a 10,000-device simulation's first round)."""
        connected = list(grid.get_node_ids())
        live = set(connected)
        found = {name: node for node, name in self.node_devices.items() if name in names and node in live}
        unknown = [n for n in connected if n not in self.node_devices]
        rng.shuffle(unknown)
        size = 0
        while len(found) < len(names) and unknown:
            size = max(2 * (len(names) - len(found)), 2 * size)
            batch, unknown = unknown[:size], unknown[size:]
            self.identify(grid, batch)
            found.update({self.node_devices[n]: n for n in batch if self.node_devices.get(n) in names})
        return found

    def name_of(self, node: int) -> str:
        """The device a node is, or how to name a node nobody identified."""
        return self.node_devices.get(node, f"node {node}")
