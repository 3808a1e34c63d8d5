"""Analytic compute: multiply-accumulates (MACs) of what a model really ran, counted as it runs.

Device compute is compared across methods whose steps differ (DRESS trains every density at or below a
device's, FjORD-KD a teacher and a student, HeteroFL one width), so it is counted from the passes that ran,
not from a formula per method: every weight layer adds, per forward call, the weights its active subnet used
times the positions it applied them at, times the batch. A pass that builds a graph (training) counts three
times its forward (the backward computes the input's and the weight's gradients: about twice the forward).
BN, pooling and activations are left out (a few percent of a conv net's MACs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dress_model.baselines.slimmable import Slim, SlimBatchNorm
from dress_model.layers import RowSparse
from dress_model.packed_layer import PackedSparse

BACKWARD_FACTOR = 2  # a backward pass costs about twice its forward


def active_weights(module: nn.Module) -> int | None:
    """The weights the module's last (or current) forward used; None for a module without weights."""
    if isinstance(module, PackedSparse):
        return module.entries(module.active_level)
    if isinstance(module, RowSparse):
        return module.rows * module.keep()
    if isinstance(module, Slim) and not isinstance(module, SlimBatchNorm):
        return int(torch.Size(module.active_shape).numel())
    if isinstance(module, nn.Conv2d | nn.Linear):
        return module.weight.numel()
    return None


def _positions(output: torch.Tensor) -> int:
    """Positions a weight is applied at per example: output pixels for a conv, 1 for a linear layer."""
    return int(output[0, 0].numel()) if output.dim() == 4 else 1


class MacMeter:
    """Counts the MACs of every forward (and implied backward) through ``model``'s weight layers."""

    def __init__(self) -> None:
        self.total = 0

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        weights = active_weights(module)
        if weights is None:
            return
        passes = 1 + BACKWARD_FACTOR if output.requires_grad else 1
        self.total += passes * weights * _positions(output) * output.shape[0]


@contextmanager
def counting_macs(*models: nn.Module) -> Iterator[MacMeter]:
    """``with counting_macs(model) as meter: train(...)`` — ``meter.total`` is what the passes cost."""
    meter = MacMeter()
    handles = [m.register_forward_hook(meter.hook) for model in models for m in model.modules()
               if active_weights(m) is not None]
    try:
        yield meter
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_macs(model: nn.Module, density: float) -> int:
    """MACs of one example's forward pass through the ``density`` subnet (or width level)."""
    arch = model.arch
    was_training, previous = model.training, model.active_density
    model.eval()
    model.set_density(density)
    try:
        with counting_macs(model) as meter:
            x = torch.zeros(1, arch.in_channels, arch.image_size, arch.image_size)
            getattr(model, "forward_layers", model)(x)  # a packed model layer by layer: the hooks see each
    finally:
        model.set_density(previous)
        model.train(was_training)
    return meter.total
