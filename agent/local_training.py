"""A device's local training, per method: what the ClientApp runs and what a calibration times.

One function trains a level the way its method does (``contracts.methods``) and counts the MACs it spent
(``dress_model.cost``); one says how many passes over its data a device takes. In the equal-rounds protocol
every method takes ``epochs`` passes, each of its own steps (a DRESS step trains every density at or below the
device's, a FjORD-KD step a teacher and a student). Compute-matched, a device at tier ``t`` spends per example
what ``epochs`` trained passes of ``t`` times the full model's MACs cost, whatever its method — the tier is a
share of the model, and the budget is that share of training the full model: a method whose step costs more
takes fewer steps (``compute_budget``).
"""

from __future__ import annotations

import dataclasses
import statistics
import zlib

from torch.utils.data import DataLoader

from contracts.methods import Method
from dress_model.baselines.ordered_dropout import train_ordered_dropout
from dress_model.cost import BACKWARD_FACTOR, counting_macs, forward_macs
from dress_model.models import DressModel
from dress_model.packed import PackedModel
from dress_model.sparsity import at_most
from dress_model.training import TrainConfig, train

TRAINED = 1 + BACKWARD_FACTOR  # a trained pass costs its forward and its backward


def device_seed(seed: int, server_round: int, device: str) -> int:
    """The seed of one device's round (its shuffle, its examples, FjORD's draws): the same for every method on
    the same fleet, so paired runs differ only in what the method does; a different one per device and round."""
    return (seed * 1_000_003 + server_round * 10_007 + zlib.crc32(device.encode())) % 2**31


def trained_levels(model: DressModel | PackedModel, level: float) -> tuple[float, ...]:
    """The model's levels at or below ``level``, ascending."""
    return at_most(model.densities, level)


def step_macs(method: Method, model: DressModel | PackedModel, level: float, distill: float,
              joint: str = "all") -> float:
    """MACs per example of one local step of ``method`` at ``level`` (FjORD's and DRESS's sandwich: the mean
    over their draws)."""
    levels = trained_levels(model, level)
    cost = {d: forward_macs(model, d) for d in levels}
    if method.name == "dress" and joint == "own":
        return TRAINED * cost[levels[-1]]
    if method.name == "dress" and joint == "ends":
        return TRAINED * (cost[levels[-1]] + (cost[levels[0]] if len(levels) > 1 else 0))
    if method.name == "dress" and joint == "sandwich":
        drawn = statistics.fmean(cost[d] for d in levels[1:-1]) if len(levels) > 2 else 0
        return TRAINED * (cost[levels[-1]] + drawn + (cost[levels[0]] if len(levels) > 1 else 0))
    if method.name == "dress":
        anchor = cost[levels[0]] if distill > 0 and len(levels) > 1 else 0
        return TRAINED * sum(cost.values()) + anchor
    if method.sampled:
        teacher = TRAINED * cost[levels[-1]] if method.kd else 0
        return teacher + TRAINED * statistics.fmean(cost.values())
    return TRAINED * cost[level]


def compute_budget(level: float, full_model_macs: int) -> float:
    """MACs per example per pass a compute-matched device at tier ``level`` may spend: that share of a trained
    pass of the full model (the same for every method, whatever its subnet at that tier costs)."""
    return TRAINED * level * full_model_macs


def local_epochs(method: Method, model: DressModel | PackedModel, level: float, epochs: float, distill: float,
                 budget: float | None, joint: str = "all") -> float:
    """Passes over the device's data this round: ``epochs``, or within a ``budget`` (``compute_budget``) as many
    of the method's steps as ``epochs`` passes of the budget pay for."""
    if budget is None:
        return epochs
    return epochs * budget / step_macs(method, model, level, distill, joint)


def train_level(method: Method, model: DressModel | PackedModel, level: float, loader: DataLoader,
                config: TrainConfig, seed: int) -> tuple[dict[float, float], int]:
    """Train ``model`` at ``level`` as ``method`` does; (last losses per level, MACs spent).

    DRESS trains its packed subnet (every density it holds, jointly); a peer its width model's ``level``."""
    if method.label_split and config.classes is None:
        raise ValueError(f"{method.name} trains on its device's labels: config.classes must name them")
    config = dataclasses.replace(config, clip_norm=method.clip_norm)
    with counting_macs(model) as meter:
        if method.name == "dress":
            losses = train(model, loader, dataclasses.replace(config, densities=trained_levels(model, level)),
                           seed=seed)
        elif method.sampled:
            losses = train_ordered_dropout(model, loader, dataclasses.replace(
                config, densities=trained_levels(model, level)), seed=seed, kd=method.kd)
        else:
            losses = train(model, loader, dataclasses.replace(config, densities=(level,)))
    return losses, meter.total
