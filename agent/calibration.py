"""Measure what each density costs on this machine, so the coordinator can match subnets to budgets.

Calibration runs before the agent has a trained model: latency does not depend on weight values and
memory only on the architecture, so a freshly initialised model of the architecture the coordinator
describes measures the same costs as the trained one will have.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from contracts.policy import CalibrationPoint
from contracts.settings import build_model
from dress_model.packed import PackedModel
from protos.dress.fleet.v1 import control_plane_pb2 as pb

DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3


def initial_model(architecture: pb.Architecture) -> PackedModel:
    """A freshly initialised packed model of the fleet's architecture: calibrated, and served until the
    coordinator publishes a trained one. ValueError for an architecture this build cannot make."""
    return PackedModel.from_dress(build_model(architecture).eval())


def image_shape(packed: PackedModel) -> tuple[int, int, int]:
    """[C, H, W] of one input image."""
    return (packed.arch.in_channels, packed.arch.image_size, packed.arch.image_size)


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

    latency_ms: median of `repeats` batch-1 forward passes after `warmup` untimed ones, with the process's
    kernel thread count (torch.get_num_threads()), which must be the one serving uses. The densities are timed
    in turn, one pass each per repeat, so a burst of load from another process lands on all of them alike and
    the median shrugs it off; timed one density after another, a burst made d=1 look 14x slower than d=0.5 on
    a busy machine. memory_mb: the packed bytes that subnet reads plus the activation peak. The model's active
    density is restored afterwards.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    x = torch.randn(1, *input_shape)
    active = packed.active_density
    activations = activation_bytes(packed, x)
    densities = sorted(packed.densities, reverse=True)
    times: dict[float, list[float]] = {d: [] for d in densities}
    try:
        for repeat in range(warmup + repeats):
            for density in densities:
                packed.set_density(density)
                start = time.perf_counter()
                packed(x)
                if repeat >= warmup:
                    times[density].append(time.perf_counter() - start)
    finally:
        packed.set_density(active)
    return [CalibrationPoint(d, 1000 * statistics.median(times[d]), (packed.nbytes(d) + activations) / 2**20)
            for d in densities]
