"""Measure what each density costs on this machine, so the coordinator can match subnets to budgets.

Calibration runs before the agent has a trained model: latency does not depend on weight values and
memory only on the architecture, so a freshly initialised model of the architecture the coordinator
describes measures the same costs as the trained one will have. It covers both jobs a device does: serving
(a batch-1 forward pass) and training (one step at ``TRAIN_BATCH`` through the packed format, as the
ClientApp trains), so the coordinator can assign a training density that fits the device too.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from contracts.policy import CalibrationPoint
from contracts.settings import build_model
from dress_model.packed import PackedModel
from dress_model.training import TrainConfig, joint_step, make_optimizer
from protos.dress.fleet.v1 import control_plane_pb2 as pb

DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3
DEFAULT_TRAIN_REPEATS = 3
TRAIN_BATCH = 32  # the fleet's default training batch


def initial_model(architecture: pb.Architecture) -> PackedModel:
    """A freshly initialised packed model of the fleet's architecture: calibrated, and served until the
    coordinator publishes a trained one. ValueError for an architecture this build cannot make."""
    return PackedModel.from_dress(build_model(architecture).eval())


def image_shape(packed: PackedModel) -> tuple[int, int, int]:
    """[C, H, W] of one input image."""
    return (packed.arch.in_channels, packed.arch.image_size, packed.arch.image_size)


def _output_bytes(packed: PackedModel, x: torch.Tensor) -> list[int]:
    """Bytes of every leaf layer's input + output in one forward pass of `x`, in the model's current mode."""
    sizes: list[int] = []

    def hook(_module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        sizes.append(sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(hook) for m in packed.net.modules() if not list(m.children())]
    try:
        packed.forward_layers(x)  # layer by layer, so every layer's hook sees its tensors
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def activation_bytes(packed: PackedModel, x: torch.Tensor) -> int:
    """Largest input + output of any one layer in a forward pass of `x`: what must be live at once.

    Row sparsity keeps every output channel, so this does not depend on the density.
    """
    return max(_output_bytes(packed, x), default=0)


def training_costs(packed: PackedModel, input_shape: Sequence[int], repeats: int = DEFAULT_TRAIN_REPEATS,
                   batch: int = TRAIN_BATCH) -> dict[float, tuple[float, float]]:
    """(ms per step, MB held) of training each stored density through the packed format, on a copy.

    ms: median of ``repeats`` steps (forward, backward, Nesterov SGD) after one untimed step. MB: what the
    step holds — the subnet's bytes three times (values, their gradients, the optimizer's momentum; indices
    counted too, so it errs high) plus every layer's input and output at ``batch``, which backward keeps."""
    if repeats < 1 or batch < 1:
        raise ValueError(f"repeats and batch must be >= 1, got {repeats} and {batch}")
    model = copy.deepcopy(packed)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, packed.arch.num_classes, (batch,))
    model.train()
    kept = sum(_output_bytes(model, x))
    costs = {}
    for density in sorted(packed.densities, reverse=True):
        optimizer, _ = make_optimizer(model, TrainConfig(densities=(density,)), total_steps=1_000_000)
        times = []
        for step in range(repeats + 1):
            start = time.perf_counter()
            joint_step(model, x, y, (density,), (1.0,), optimizer)
            if step:
                times.append(time.perf_counter() - start)
        costs[density] = (1000 * statistics.median(times), (3 * packed.nbytes(density) + kept) / 2**20)
    return costs


def calibrate(
    packed: PackedModel,
    input_shape: Sequence[int],
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    train_repeats: int = DEFAULT_TRAIN_REPEATS,
) -> list[CalibrationPoint]:
    """One CalibrationPoint per stored density, densest first; ``train_repeats`` = 0 leaves the training cost
    unmeasured (0).

    latency_ms: median of `repeats` batch-1 forward passes after `warmup` untimed ones, with the process's
    kernel thread count (torch.get_num_threads()), which must be the one serving uses. The densities are timed
    in turn, one pass each per repeat, so a burst of load from another process lands on all of them alike and
    the median shrugs it off; timed one density after another, a burst made d=1 look 14x slower than d=0.5 on
    a busy machine. memory_mb: the packed bytes that subnet reads plus the activation peak. The model's active
    density is restored afterwards.
    """
    if repeats < 1 or warmup < 0 or train_repeats < 0:
        raise ValueError(f"repeats must be >= 1, warmup and train_repeats >= 0, got {repeats}, {warmup} and "
                         f"{train_repeats}")
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
    training = training_costs(packed, input_shape, train_repeats) if train_repeats else {}
    return [CalibrationPoint(d, 1000 * statistics.median(times[d]), (packed.nbytes(d) + activations) / 2**20,
                             *training.get(d, (0.0, 0.0)))
            for d in densities]
