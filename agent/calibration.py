"""Measure what each density costs on this machine, so the coordinator can match subnets to budgets.

Calibration runs before the agent has a trained model: latency does not depend on weight values and
memory only on the architecture, so a freshly initialised model of the declared architecture measures
the same costs as the trained one will have.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from coordinator.policy import CalibrationPoint
from dress_model.data import DATASETS, dataset_shape
from dress_model.models import model_for_dataset
from dress_model.packed import PackedModel
from dress_model.sparsity import parse_densities

# (input [C, H, W], classes) per dataset: the agent must know the architecture without the dataset files.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {name: dataset_shape(name) for name in DATASETS}
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3


def dataset_input_shape(dataset: str) -> tuple[int, int, int]:
    """The [C, H, W] of one image of `dataset`; ValueError naming the known datasets otherwise."""
    return dataset_shape(dataset)[0]


def initial_model(model: str, densities: str | Sequence[float], dataset: str, width: int) -> PackedModel:
    """A freshly initialised packed model of the declared architecture: calibrated, and served until the
    coordinator publishes a trained one."""
    return PackedModel.from_dress(model_for_dataset(model, parse_densities(densities), dataset, width).eval())


def activation_bytes(packed: PackedModel, x: torch.Tensor) -> int:
    """Largest input + output of any one layer in a forward pass of `x`: what must be live at once.

    Row sparsity keeps every output channel, so this does not depend on the density.
    """
    peak = 0

    def hook(_module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal peak
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        peak = max(peak, sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(hook) for m in packed.net.modules() if not list(m.children())]
    try:
        packed(x)
    finally:
        for handle in handles:
            handle.remove()
    return peak


def calibrate(
    packed: PackedModel,
    input_shape: Sequence[int],
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
) -> list[CalibrationPoint]:
    """One CalibrationPoint per stored density, densest first.

    latency_ms: median of `repeats` batch-1 forward passes after `warmup` untimed ones (the median
    shrugs off the scheduler's hiccups), with the process's kernel thread count (torch.get_num_threads()),
    which must be the one serving uses. memory_mb: the packed bytes that subnet reads plus the activation
    peak. The model's active density is restored afterwards.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    x = torch.randn(1, *input_shape)
    active = packed.active_density
    activations = activation_bytes(packed, x)
    points = []
    try:
        for density in sorted(packed.densities, reverse=True):
            packed.set_density(density)
            for _ in range(warmup):
                packed(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                packed(x)
                times.append(time.perf_counter() - start)
            memory = packed.nbytes(density) + activations
            points.append(CalibrationPoint(density, 1000 * statistics.median(times), memory / 2**20))
    finally:
        packed.set_density(active)
    return points
