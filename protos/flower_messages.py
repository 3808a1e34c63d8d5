"""The contract between the DRESS ServerApp and ClientApp: what a Flower message carries, both ways.

Down: the device's subnet as one uint8 array holding the packed file (the same bytes a device stores and
executes). Up: the trained packed tensors without ``indices``, which the server already holds.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from dress_model.packed import PackedModel

PAYLOAD = "packed"


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
