"""A device's local training, per method: what the ClientApp runs and what a calibration times.

One function trains a density the way its method does (``contracts.methods``) and counts the MACs it spent
(``dress_model.cost``); one says how many passes over its data a device takes. In the equal-rounds protocol
every method takes ``epochs`` passes, each of its own steps (a DRESS step trains what its ``joint`` rule says,
a FjORD-KD step a teacher and a student). Compute-matched, a device at density ``d`` spends per example
what ``epochs`` trained passes of ``d`` times the full model's MACs cost, whatever its method — the density is
a share of the model, and the budget is that share of training the full model: a method whose step costs more
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
from dress_model.training import OWN_SHARE, TrainConfig, train

TRAINED = 1 + BACKWARD_FACTOR  # a trained pass costs its forward and its backward


def device_seed(seed: int, server_round: int, device: str) -> int:
    """The seed of one device's round (its shuffle, its examples, FjORD's draws): the same for every method on
    the same fleet, so paired runs differ only in what the method does; a different one per device and round."""
    return (seed * 1_000_003 + server_round * 10_007 + zlib.crc32(device.encode())) % 2**31


def trained_densities(model: DressModel | PackedModel, density: float) -> tuple[float, ...]:
    """The model's densities up to ``density`` (one of them), ascending."""
    return model.densities[:model.densities.index(density) + 1]


def step_macs(method: Method, model: DressModel | PackedModel, density: float, distill: float,
              joint: str = "all") -> float:
    """MACs per example of one local step of ``method`` at ``density`` (FjORD's and DRESS's sandwiches: the mean
    over their draws)."""
    trained = trained_densities(model, density)
    cost = {d: forward_macs(model, d) for d in trained}
    anchor = cost[trained[0]] if distill > 0 and len(trained) > 1 else 0  # the anchor's forward (DRESS)
    if method.name == "dress" and joint == "own":
        return TRAINED * cost[trained[-1]] + anchor
    if method.name == "dress" and joint == "own-drawn":  # the mean over its draws
        sparser = statistics.fmean(cost[d] for d in trained[:-1]) if len(trained) > 1 else cost[trained[-1]]
        return TRAINED * (OWN_SHARE * cost[trained[-1]] + (1 - OWN_SHARE) * sparser)
    if method.name == "dress" and joint == "ends":
        return TRAINED * (cost[trained[-1]] + (cost[trained[0]] if len(trained) > 1 else 0))
    if method.name == "dress" and joint in ("sandwich", "sandwich-labels"):
        drawn = statistics.fmean(cost[d] for d in trained[1:-1]) if len(trained) > 2 else 0
        return TRAINED * (cost[trained[-1]] + drawn + (cost[trained[0]] if len(trained) > 1 else 0))
    if method.name == "dress":
        return TRAINED * sum(cost.values()) + anchor
    if method.sampled:
        teacher = TRAINED * cost[trained[-1]] if method.kd else 0
        return teacher + TRAINED * statistics.fmean(cost.values())
    return TRAINED * cost[density]


def compute_budget(density: float, full_model_macs: int) -> float:
    """MACs per example per pass a compute-matched device at ``density`` may spend: that share of a trained
    pass of the full model (the same for every method, whatever its subnet at that density costs)."""
    return TRAINED * density * full_model_macs


def local_epochs(method: Method, model: DressModel | PackedModel, density: float, epochs: float, distill: float,
                 budget: float | None, joint: str = "all") -> float:
    """Passes over the device's data this round: ``epochs``, or within a ``budget`` (``compute_budget``) as many
    of the method's steps as ``epochs`` passes of the budget pay for."""
    if budget is None:
        return epochs
    return epochs * budget / step_macs(method, model, density, distill, joint)


def train_density(method: Method, model: DressModel | PackedModel, density: float, loader: DataLoader,
                  config: TrainConfig, seed: int) -> tuple[dict[float, float], int]:
    """Train ``model`` at ``density`` as ``method`` does; (last losses per density, MACs spent).

    DRESS trains its packed subnet by its ``joint`` rule; a peer its width model's ``density``."""
    if method.label_split and config.classes is None:
        raise ValueError(f"{method.name} trains on its device's labels: config.classes must name them")
    config = dataclasses.replace(config, clip_norm=method.clip_norm)
    with counting_macs(model) as meter:
        if method.name == "dress":
            losses = train(model, loader, dataclasses.replace(config, densities=trained_densities(model, density)),
                           seed=seed)
        elif method.sampled:
            losses = train_ordered_dropout(model, loader, dataclasses.replace(
                config, densities=trained_densities(model, density)), seed=seed, kd=method.kd)
        else:
            losses = train(model, loader, dataclasses.replace(config, densities=(density,)))
    return losses, meter.total
