"""The contract between the DRESS ServerApp and ClientApp: what a Flower message carries, both ways.

- ``query.status``: the server asks a node which device it is (node-config never reaches the SuperLink);
  the reply's ``status`` record names the device and its profile.
- train, down: the device's subnet as one uint8 array holding the packed file (the same bytes a device stores
  and executes), and a ``config`` record with the server round, the level to train (the index of its density in
  the run's model's densities) and the training knobs.
  A peer method (contracts.methods) sends the width prefixes of its level's tensors instead.
- train, up: the trained packed tensors without ``indices`` (the server holds them) — a peer's: its trained
  prefixes — and a ``metrics`` record.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from contracts.settings import RunSettings
from dress_model.packed import PackedModel

PAYLOAD = "packed"
STATUS_QUERY = "query.status"
STATUS = "status"
TRAIN_KEYS = ("epochs", "lr", "distill", "batch-size", "max-examples")
"""Run settings the server sends with every train message, so a strategy may vary them per round."""


def status_reply(query: Message, device: str, profile: str) -> Message:
    return Message(RecordDict({STATUS: ConfigRecord({"device": device, "profile": profile})}), reply_to=query)


def device_of(reply: Message) -> str:
    """The device name a status reply carries; ValueError for a reply that breaks the contract."""
    try:
        return str(reply.content[STATUS]["device"])
    except KeyError:
        raise ValueError(f"status reply lacks {STATUS}.device; got {list(reply.content.keys())}") from None


def train_config(settings: RunSettings) -> ConfigRecord:
    config = settings.to_run_config()
    return ConfigRecord({key: config[key] for key in TRAIN_KEYS})


def train_message(node_id: int, subnet: ArrayRecord, config: ConfigRecord, server_round: int,
                  level: int, ttl: float | None = None) -> Message:
    """``level``: the densest subnet the device trains, as its index in the run's model's densities; DRESS's packed
    file says it too, a peer's slices do not. ``ttl``: seconds the message lives (Flower's default: 12 hours); a
    round's messages live as long as the round waits, so a device that comes back after it never pulls a round
    that is over (and trains it, late for the next one), and a reply after it is refused at the SuperLink."""
    config = ConfigRecord({**config, "server-round": server_round, "level": level})
    content = RecordDict({"arrays": subnet, "config": config})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, ttl=ttl)


def train_reply(train: Message, trained: ArrayRecord, metrics: dict[str, float]) -> Message:
    return Message(RecordDict({"arrays": trained, "metrics": MetricRecord(metrics)}), reply_to=train)


def subnet_record(packed: PackedModel) -> ArrayRecord:
    return ArrayRecord(array_dict={PAYLOAD: Array(np.frombuffer(packed.to_bytes(), dtype=np.uint8))})


def subnet_from_record(record: ArrayRecord) -> PackedModel:
    if PAYLOAD not in record:
        raise ValueError(f"train message lacks the {PAYLOAD!r} array; got {sorted(record.keys())}")
    return PackedModel.from_bytes(record[PAYLOAD].numpy().tobytes(), source="train message")


def upload_state(trained: PackedModel) -> dict[str, torch.Tensor]:
    """Everything a device trained, minus the index buffers the server sent it."""
    return {k: v for k, v in trained.net.state_dict().items() if not k.endswith((".indices", ".bands"))}


def upload_record(trained: PackedModel) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=upload_state(trained))


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of a record as it travels (array data, excluding message framing)."""
    return sum(len(a.data) for a in record.values())
