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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from contracts.settings import MEAN, Aggregation
from dress_model.layers import DensityBatchNorm, RowSparse
from dress_model.models import DressModel
from dress_model.packed_format import unpack_rows


@dataclass
class Update:
    """One device's reply: what it was sent (DRESS: its packed subnet, for the indices; a peer: its level's
    slices) and the tensors it trained."""

    sent: Any
    tensors: dict[str, torch.Tensor]
    num_examples: int
    classes: frozenset[int] | None = None  # HeteroFL: the labels the device trained on (None: all)


@torch.no_grad()
def aggregate(model: DressModel, updates: list[Update], rule: Aggregation = MEAN, damped: bool = True) -> None:
    """Move ``model`` in place towards each weight's average over the devices that trained it (weights, biases,
    per-density BN), by the share of the round's examples those devices hold.

    ``rule`` says which average: the examples-weighted mean (FedAvg), or, robust to a minority of devices
    replying anything they like, the coordinate-wise median or trimmed mean over the devices that held the
    weight (unweighted: a liar would otherwise claim many examples). ``damped`` False moves each weight all the
    way to that average (HeteroFL's counting); which pays depends on the fleet, so every method tunes it
    (measurements: docs/DECISIONS.md)."""
    updates = [u for u in updates if u.num_examples > 0]
    if not updates:
        return
    examples = float(sum(u.num_examples for u in updates))
    state = model.state_dict()
    for key, current in state.items():
        if not current.is_floating_point():
            continue  # row orders and BN counters are bookkeeping, not learned
        old = current.double()
        if rule.name == "mean":
            total = torch.zeros_like(old)
            weight = torch.zeros_like(old)
            for value, held, n in _contributions(model, key, current, updates):
                total += n * value * held
                weight += n * held
            average = total / weight.clamp_min(1e-300)
        else:
            parts = list(_contributions(model, key, current, updates))
            if not parts:
                continue
            values = torch.stack([value for value, _, _ in parts])
            held = torch.stack([h for _, h, _ in parts])
            weight = sum(n * h for _, h, n in parts)
            average = _robust(values, held, rule)
        # old + (weight / examples) * (average - old): a weight nobody trained (weight 0) keeps its value
        share = weight / examples if damped else (weight > 0).double()
        moved = torch.where(weight > 0, old + share * (average - old), old)
        current.copy_(moved.to(current.dtype))
    model.load_state_dict(state)


def _contributions(model: DressModel, key: str, current: torch.Tensor,
                   updates: list[Update]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per device that sent ``key``: (its value in the global tensor's shape, float64; 1 where it trained the
    element, else 0; its examples)."""
    owner, _, field = key.rpartition(".")
    module = model.get_submodule(owner)
    n_all = len(model.densities)
    for u in updates:
        if isinstance(module, RowSparse) and field == "weight":
            layer = u.sent.net.get_submodule(owner)
            values = u.tensors[f"{owner}.values"]
            w2d = unpack_rows(values, layer.indices, layer.bands, layer.rows, layer.cols)
            mask = unpack_rows(torch.ones_like(values), layer.indices, layer.bands, layer.rows, layer.cols)
            yield w2d.reshape(current.shape).double(), mask.reshape(current.shape).double(), u.num_examples
            continue
        theirs = u.tensors.get(key)
        if theirs is None:
            continue
        held = torch.ones_like(current, dtype=torch.float64)
        if isinstance(module, DensityBatchNorm) and current.shape[:1] == (n_all,) and theirs.shape[0] < n_all:
            rows = theirs.shape[0]  # only the rows of the densities this device trained
            value = torch.zeros_like(current, dtype=torch.float64)
            value[:rows] = theirs.double()
            held[rows:] = 0
            yield value, held, u.num_examples
        else:
            yield theirs.double().reshape(current.shape), held, u.num_examples


def _robust(values: torch.Tensor, held: torch.Tensor, rule: Aggregation) -> torch.Tensor:
    """Coordinate-wise median or trimmed mean over the devices (dim 0) that held each element."""
    count = held.sum(0)
    ranked = torch.where(held > 0, values, torch.inf).sort(dim=0).values  # the holders first, ascending
    rank = torch.arange(values.shape[0], dtype=torch.float64).reshape(-1, *([1] * (values.dim() - 1)))
    if rule.name == "median":  # the middle one, or the mean of the middle two
        low, high = torch.floor((count - 1) / 2), torch.ceil((count - 1) / 2)
        keep = (rank == low) | (rank == high)
    else:  # at least the share ``trim`` from each end (rounded up: of the three devices that trained an upper
        # band, one is cut from each end), while at least one holder stays
        cut = torch.minimum(torch.ceil(rule.trim * count - 1e-9), torch.floor((count - 1) / 2)).clamp_min(0)
        keep = (rank >= cut) & (rank < count - cut)
    kept = torch.where(keep, ranked, 0.0)
    return kept.sum(0) / keep.sum(0).clamp_min(1)
