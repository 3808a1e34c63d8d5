"""Width-slimmable layers (Slimmable Networks, Yu et al. 2019): the baseline DRESS is compared against.

A slimmable subnet keeps the first ``ceil(width * channels)`` channels of every layer, with switchable
(per-width) batch norm. Each layer reads its active input width from the incoming tensor, so only the
output side needs the width; the classifier always keeps every class. ``slimmable_like`` builds the twin of
a DRESS model (same architecture, same constructor) whose level widths hold as many parameters as each DRESS
subnet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dress_model.layers import DensityAware
from dress_model.models import Architecture, DressModel, Role, create_model


class Slim(DensityAware):
    """Shared state: per-level width fractions; ``slim_out`` is False for the classifier."""

    widths: tuple[float, ...]
    slim_out: bool
    active_params: int

    def _init_slim(self, densities: tuple[float, ...], slim_out: bool) -> None:
        self._init_density(densities)
        self.widths = tuple(1.0 for _ in densities)
        self.slim_out = slim_out
        self.active_params = 0

    def active_out(self, full: int) -> int:
        if not self.slim_out:
            return full
        return max(1, math.ceil(self.widths[self.active_index] * full - 1e-9))


class SlimConv2d(Slim, nn.Conv2d):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        densities: tuple[float, ...],
        stride: int = 1,
        padding: int = 0,
        slim_out: bool = True,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self._init_slim(densities, slim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight[: self.active_out(self.out_channels), : x.shape[1]]
        self.active_params = weight.numel()
        return self._conv_forward(x, weight, None)


class SlimLinear(Slim, nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, densities: tuple[float, ...], slim_out: bool = True
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features)
        self._init_slim(densities, slim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.active_out(self.out_features)
        weight, bias = self.weight[:out, : x.shape[1]], self.bias[:out]
        self.active_params = weight.numel() + bias.numel()
        return F.linear(x, weight, bias)


class SlimBatchNorm(Slim, nn.Module):
    """Switchable BN over the active channels: statistics and affine per width level."""

    def __init__(self, num_features: int, densities: tuple[float, ...], momentum: float = 0.1) -> None:
        nn.Module.__init__(self)
        self._init_slim(densities, slim_out=True)
        n = len(densities)
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(n, num_features))
        self.bias = nn.Parameter(torch.zeros(n, num_features))
        self.register_buffer("running_mean", torch.zeros(n, num_features))
        self.register_buffer("running_var", torch.ones(n, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, c = self.active_index, x.shape[1]
        self.active_params = 2 * c
        return F.batch_norm(
            x,
            self.running_mean[i, :c],
            self.running_var[i, :c],
            self.weight[i, :c],
            self.bias[i, :c],
            self.training,
            self.momentum,
            1e-5,
        )


class SlimmableFamily:
    """Every layer slims its output channels (the classifier keeps all classes); BN switches per width."""

    def __init__(self, arch: Architecture) -> None:
        self.d = arch.densities

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, role: Role = "body") -> nn.Module:
        return SlimConv2d(cin, cout, k, self.d, stride=stride, padding=padding)

    def linear(self, fin: int, fout: int, role: Role = "body") -> nn.Module:
        return SlimLinear(fin, fout, self.d, slim_out=role != "head")

    def norm(self, c: int) -> nn.Module:
        return SlimBatchNorm(c, self.d)


def set_widths(model: DressModel, widths: tuple[float, ...]) -> None:
    """One width fraction per level (the model's densities index the levels)."""
    if len(widths) != len(model.densities):
        raise ValueError(f"need one width per level ({len(model.densities)}), got {len(widths)}")
    for m in model.modules():
        if isinstance(m, Slim):
            m.widths = widths


def widths(model: DressModel) -> tuple[float, ...]:
    return next(m.widths for m in model.modules() if isinstance(m, Slim))


@torch.no_grad()
def slim_params(model: DressModel, density: float) -> int:
    """Weights the level holds: counted by running it once, since each layer's input width follows its input."""
    was_training, previous = model.training, model.active_density
    model.eval()
    model.set_density(density)
    a = model.arch
    model(torch.zeros(1, a.in_channels, a.image_size, a.image_size))
    total = sum(m.active_params for m in model.modules() if isinstance(m, Slim))
    model.set_density(previous)
    model.train(was_training)
    return total


def fit_widths(model: DressModel, targets: list[int], tol: float = 1e-4) -> tuple[float, ...]:
    """Bisect each level's width so its active parameter count matches the target (never exceeds it)."""
    fitted: list[float] = []
    for i, target in enumerate(targets):
        lo, hi = 1e-3, 1.0
        while hi - lo > tol:
            mid = (lo + hi) / 2
            trial = list(widths(model))
            trial[i] = mid
            set_widths(model, tuple(trial))
            if slim_params(model, model.densities[i]) <= target:
                lo = mid
            else:
                hi = mid
        fitted.append(lo)
        set_widths(model, tuple(fitted + [1.0] * (len(targets) - len(fitted))))
    return tuple(fitted)


def slimmable_like(dress: DressModel) -> DressModel:
    """A slimmable twin of a DRESS model with equal parameter count per level."""
    model = create_model(dress.arch, family=SlimmableFamily)
    fit_widths(model, [dress.subnet_params(d) for d in dress.densities])
    return model
