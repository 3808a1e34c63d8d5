"""Federated DRESS aggregation: a weight moves by the share of the round's examples that trained it.

A device trains the subnet at its own density (and every sparser one nested in it), so it updates only the
weights inside its bands and only the BN rows of its densities. The server scatters each reply's packed
values back to their columns and averages per weight over the devices that trained it (HeteroFL's counting
aggregation, on row-sparse prefixes instead of channel prefixes) — then moves the weight only that share of the
way: ``new = old + (examples that trained it / round's examples) * (average - old)``. This is FedAvg with every
device that did not hold the weight counted as replying it unchanged. Without the damping, a dense band that
one device trained in a round jumps to that device's local optimum while the sparse prefix, averaged over many,
barely moves; the bands drift apart and the densest subnet ends up the least accurate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dress_model.layers import DensityBatchNorm
from dress_model.models import DressModel
from dress_model.packed import unpack_rows


@dataclass
class Update:
    """One device's reply: what it was sent (DRESS: its packed subnet, for the indices; a peer: its level's
    slices) and the tensors it trained."""

    sent: Any
    tensors: dict[str, torch.Tensor]
    num_examples: int


@torch.no_grad()
def aggregate(model: DressModel, updates: list[Update]) -> None:
    """Move ``model`` in place towards each weight's average over the devices that trained it (weights, biases,
    per-density BN), by the share of the round's examples those devices hold."""
    updates = [u for u in updates if u.num_examples > 0]
    if not updates:
        return
    examples = float(sum(u.num_examples for u in updates))
    n_all = len(model.densities)
    state = model.state_dict()
    sparse = dict(model.sparse_layers())
    for key, current in state.items():
        owner, _, field = key.rpartition(".")
        if owner in sparse and field == "order":
            continue
        total = torch.zeros_like(current, dtype=torch.float64)
        weight = torch.zeros_like(current, dtype=torch.float64)
        for u in updates:
            if owner in sparse and field == "weight":
                layer = u.sent.net.get_submodule(owner)
                values = u.tensors[f"{owner}.values"]
                w2d = unpack_rows(values, layer.indices, layer.bands, layer.rows, layer.cols)
                mask = unpack_rows(torch.ones_like(values), layer.indices, layer.bands, layer.rows, layer.cols)
                total += u.num_examples * w2d.reshape(current.shape)
                weight += u.num_examples * mask.reshape(current.shape)
                continue
            theirs = u.tensors.get(key)
            if theirs is None:
                continue
            per_density = isinstance(model.get_submodule(owner), DensityBatchNorm) and current.shape[:1] == (n_all,)
            if per_density and theirs.shape[0] < n_all:  # only the rows of the densities this device trained
                rows = theirs.shape[0]
                total[:rows] += u.num_examples * theirs.double()
                weight[:rows] += u.num_examples
            else:
                total += u.num_examples * theirs.double()
                weight += u.num_examples
        if not current.is_floating_point():
            continue  # counters (BN num_batches) are bookkeeping, not learned
        # old + (weight / examples) * (total / weight - old), written without dividing by zero
        moved = current.double() + (total - weight * current.double()) / examples
        current.copy_(moved.to(current.dtype))
    model.load_state_dict(state)
