"""Measure what each density costs on this machine, so the coordinator can match subnets to budgets.

Calibration runs before the agent has a trained model: latency does not depend on weight values and
memory only on the architecture, so a freshly initialised model of the architecture the coordinator
describes measures the same costs as the trained one will have. It covers both jobs a device does: serving
(a batch-1 forward pass) and training (a step at ``TRAIN_BATCH`` as the ClientApp trains: every density at or
below the one timed, jointly, through the packed format), so the coordinator can assign a training density that
fits the device too.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from agent.local_training import train_density
from contracts.methods import Method, get_method
from contracts.policy import CalibrationPoint
from dress_model.baselines.slimmable import slim_params
from dress_model.models import Architecture, DressModel, create_model
from dress_model.native_forward import freeze_dense
from dress_model.packed import PackedModel
from dress_model.training import TrainConfig

DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3
DEFAULT_TRAIN_REPEATS = 3
TRAIN_BATCH = 32  # the fleet's default training batch
DRESS = get_method("dress")
Model = PackedModel | DressModel  # a DRESS device's packed model, or a peer's width model (simulations)


def initial_model(architecture: Architecture) -> PackedModel:
    """A freshly initialised packed model of the fleet's architecture: calibrated, and served until the
    coordinator publishes a trained one. ValueError for an architecture this build cannot make."""
    return PackedModel.from_dress(create_model(architecture).eval())


def image_shape(packed: PackedModel) -> tuple[int, int, int]:
    """[C, H, W] of one input image."""
    return (packed.arch.in_channels, packed.arch.image_size, packed.arch.image_size)


def _output_bytes(model: Model, x: torch.Tensor) -> list[int]:
    """Bytes of every leaf layer's input + output in one forward pass of `x`, in the model's current mode."""
    sizes: list[int] = []

    def hook(_module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        sizes.append(sum(t.numel() * t.element_size() for t in tensors))

    net = model.net if isinstance(model, PackedModel) else model
    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        with torch.set_grad_enabled(model.training):
            getattr(model, "forward_layers", model)(x)  # layer by layer, so every layer's hook sees its tensors
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def activation_bytes(model: Model, x: torch.Tensor) -> int:
    """Largest input + output of any one layer in a forward pass of `x`: what must be live at once.

    Row sparsity keeps every output channel, so for DRESS this does not depend on the density."""
    return max(_output_bytes(model, x), default=0)


def level_nbytes(model: Model, density: float) -> int:
    """Bytes of the weights a subnet (DRESS: packed, indices included) or width level holds."""
    return model.nbytes(density) if isinstance(model, PackedModel) else 4 * slim_params(model, density)


def training_costs(model: Model, input_shape: Sequence[int], repeats: int = DEFAULT_TRAIN_REPEATS,
                   batch: int = TRAIN_BATCH, method: Method = DRESS, joint: str = "all"
                   ) -> dict[float, tuple[float, float]]:
    """(ms per step, MB held) of a device's training step at each level, as ``method`` trains (DRESS: every
    density at or below it, jointly — or by the ``joint`` rule it trains with —, through the packed format;
    ``agent.local_training``), on a copy.

    ms: ``repeats`` steps timed after one untimed one. MB: what the step holds — the level's bytes three times
    (values, their gradients, the optimizer's momentum; DRESS's indices counted too, so it errs high) plus every
    layer's input and output at ``batch``, which backward keeps."""
    if repeats < 1 or batch < 1:
        raise ValueError(f"repeats and batch must be >= 1, got {repeats} and {batch}")
    model = copy.deepcopy(model)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, model.arch.num_classes, (batch,))
    model.train()
    kept = sum(_output_bytes(model, x))
    config = TrainConfig(rerank_every=0, recalibrate_batches=0, joint=joint,
                         classes=tuple(range(model.arch.num_classes)) if method.label_split else None)
    costs = {}
    for density in sorted(model.densities, reverse=True):
        times = []
        for steps in (1, repeats):  # the first call warms up
            loader = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps)), batch_size=batch)
            start = time.perf_counter()
            train_density(method, model, density, loader, config, seed=0)
            times.append((time.perf_counter() - start) / steps)
        costs[density] = (1000 * times[-1], (3 * level_nbytes(model, density) + kept) / 2**20)
    return costs


def _latencies(forwards: dict[float, Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int,
               warmup: int) -> dict[float, float]:
    """Median ms of a forward pass of ``x`` per density, the densities timed in turn within each repeat."""
    times: dict[float, list[float]] = {d: [] for d in forwards}
    with torch.inference_mode():
        for repeat in range(warmup + repeats):
            for density, forward in forwards.items():
                start = time.perf_counter()
                forward(x)
                if repeat >= warmup:
                    times[density].append(time.perf_counter() - start)
    return {d: 1000 * statistics.median(t) for d, t in times.items()}


def _serving_forwards(model: Model, densities: Sequence[float],
                      input_shape: Sequence[int]) -> dict[float, Callable[[torch.Tensor], object]]:
    """How each density is served: DRESS's packed model switching its active subnet (compiled forwards); a
    width level as the dense network of that width, frozen by TorchScript for oneDNN (its fastest dense form
    here, as DRESS's full subnet is), or eager where this torch cannot freeze it."""
    if isinstance(model, PackedModel):
        def switched(density: float) -> Callable[[torch.Tensor], object]:
            return lambda x: (model.set_density(density), model(x))
        return {d: switched(d) for d in densities}
    forwards = {}
    for density in densities:
        level = copy.deepcopy(model).eval()
        level.set_density(density)
        frozen = freeze_dense(level, tuple(input_shape))
        forwards[density] = frozen if frozen is not None else level
    return forwards


def calibrate(
    packed: Model,
    input_shape: Sequence[int],
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    train_repeats: int = DEFAULT_TRAIN_REPEATS,
    method: Method = DRESS,
    joint: str = "all",
) -> list[CalibrationPoint]:
    """One CalibrationPoint per stored density (a peer's model: per width level), densest first;
    ``train_repeats`` = 0 leaves the training cost unmeasured (0).

    latency_ms: median of `repeats` batch-1 forward passes after `warmup` untimed ones, with the process's
    kernel thread count (torch.get_num_threads()), which must be the one serving uses. The densities are timed
    in turn, one pass each per repeat, so a burst of load from another process lands on all of them alike and
    the median shrugs it off; timed one density after another, a burst made d=1 look 14x slower than d=0.5 on
    a busy machine. memory_mb: the bytes that subnet reads plus the activation peak. The model's active
    density is restored afterwards. A peer's width model (simulations only) is timed as torch runs it, dense.
    """
    if repeats < 1 or warmup < 0 or train_repeats < 0:
        raise ValueError(f"repeats must be >= 1, warmup and train_repeats >= 0, got {repeats}, {warmup} and "
                         f"{train_repeats}")
    x = torch.randn(1, *input_shape)
    was_training, active = packed.training, packed.active_density
    packed.eval()
    activations = activation_bytes(packed, x)
    densities = sorted(packed.densities, reverse=True)
    try:
        latency = _latencies(_serving_forwards(packed, densities, input_shape), x, repeats, warmup)
    finally:
        packed.set_density(active)
        packed.train(was_training)
    training = (training_costs(packed, input_shape, train_repeats, method=method, joint=joint) if train_repeats
                else {})
    return [CalibrationPoint(d, latency[d], (level_nbytes(packed, d) + activations) / 2**20,
                             *training.get(d, (0.0, 0.0)))
            for d in densities]
