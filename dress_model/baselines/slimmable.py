"""Width-nested subnets: the family of baselines DRESS is compared against, centrally and in a fleet.

A width subnet keeps the first ``ceil(width * channels)`` channels of every layer. Each layer reads its active
input width from the incoming tensor, so only the output side needs the width; the classifier always keeps
every class. The variants differ in batch norm and scaling:

- Slimmable Networks (Yu et al. 2019): switchable BN, affine and statistics per width (``WidthFamily()``).
- HeteroFL (Diao et al. 2021): static BN — one affine shared by all widths, statistics recomputed after training
  (here per width, on server-held data) — and a scaler that divides a layer's output by its width
  (``WidthFamily(bn="static", scaler=True)``).
- FjORD (Horváth et al. 2021): ordered dropout over the same nesting (``WidthFamily(bn="static")``).

``width_twin`` builds the twin of a DRESS model (same architecture, same constructor) whose level widths hold
as many parameters as each DRESS subnet; ``level_slices`` says which prefix of every tensor a level holds, which
is what a federated peer sends a device and averages back.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dress_model.layers import DensityAware, DensityBatchNorm
from dress_model.models import Architecture, DressModel, Role, create_model


class Slim(DensityAware):
    """Shared state: per-level width fractions; ``slim_out`` is False for the classifier."""

    widths: tuple[float, ...]
    slim_out: bool
    scaler: bool  # HeteroFL: divide the output by the width
    active_params: int
    active_shape: tuple[int, ...]  # the weight prefix the last forward used (what the level holds)

    def _init_slim(self, densities: tuple[float, ...], slim_out: bool, scaler: bool = False) -> None:
        self._init_density(densities)
        self.widths = tuple(1.0 for _ in densities)
        self.slim_out = slim_out
        self.scaler = scaler and slim_out
        self.active_params = 0
        self.active_shape = ()

    def active_out(self, full: int) -> int:
        if not self.slim_out:
            return full
        return max(1, math.ceil(self.widths[self.active_level] * full - 1e-9))

    def scale(self, out: torch.Tensor) -> torch.Tensor:
        """HeteroFL's scaler. Applied in inference too: the per-level BN statistics that follow are gathered in
        training mode, so a train-only scaler would feed them activations 1/width times smaller than they saw."""
        if self.scaler:
            return out / self.widths[self.active_level]
        return out


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
        scaler: bool = False,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self._init_slim(densities, slim_out, scaler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight[: self.active_out(self.out_channels), : x.shape[1]]
        self.active_params = weight.numel()
        self.active_shape = tuple(weight.shape)
        return self.scale(self._conv_forward(x, weight, None))


class SlimLinear(Slim, nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, densities: tuple[float, ...], slim_out: bool = True,
        scaler: bool = False,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features)
        self._init_slim(densities, slim_out, scaler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.active_out(self.out_features)
        weight, bias = self.weight[:out, : x.shape[1]], self.bias[:out]
        self.active_params = weight.numel() + bias.numel()
        self.active_shape = tuple(weight.shape)
        return self.scale(F.linear(x, weight, bias))


class SlimBatchNorm(Slim, DensityBatchNorm):
    """Batch norm over the active channels: statistics per width level, affine per level or shared.

    A DensityBatchNorm on a channel prefix, so BN recalibration and evaluation treat it like DRESS's."""

    def __init__(self, num_features: int, densities: tuple[float, ...], affine: str = "per-density") -> None:
        DensityBatchNorm.__init__(self, num_features, densities, affine=affine)
        self._init_slim(densities, slim_out=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        self.active_params = 2 * c
        self.active_shape = (c,)
        return self.normalize(x, c)


class WidthFamily:
    """Every layer slims its output channels (the classifier keeps all classes).

    ``bn="switchable"``: affine per width (Slimmable); ``bn="static"``: one shared affine (HeteroFL, FjORD).
    ``scaler``: HeteroFL's scaler on every slimmed layer."""

    def __init__(self, arch: Architecture, bn: str = "switchable", scaler: bool = False) -> None:
        if bn not in ("switchable", "static"):
            raise ValueError(f"width BN must be 'switchable' or 'static', got {bn!r}")
        self.d = arch.densities
        self.affine = "per-density" if bn == "switchable" else "shared"
        self.scaler = scaler

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, role: Role = "body") -> nn.Module:
        return SlimConv2d(cin, cout, k, self.d, stride=stride, padding=padding, scaler=self.scaler)

    def linear(self, fin: int, fout: int, role: Role = "body") -> nn.Module:
        return SlimLinear(fin, fout, self.d, slim_out=role != "head", scaler=self.scaler)

    def norm(self, c: int) -> nn.Module:
        return SlimBatchNorm(c, self.d, affine=self.affine)


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


def width_twin(dress: DressModel, bn: str = "switchable", scaler: bool = False,
               levels: tuple[float, ...] | None = None) -> DressModel:
    """A width-nested twin of a DRESS model: at each level (a DRESS density; all of them unless ``levels`` picks
    some) as many parameters as that DRESS subnet, never more."""
    levels = dress.densities if levels is None else levels
    for d in levels:
        dress.level_of(d)
    arch = dataclasses.replace(dress.arch, densities=tuple(levels))
    model = create_model(arch, family=lambda a: WidthFamily(a, bn=bn, scaler=scaler))
    targets = [dress.subnet_params(d) for d in levels]
    fit_widths(model, targets)
    for d, target in zip(levels, targets):
        if slim_params(model, d) > target:
            raise ValueError(f"no width of {arch.name} holds as few as {target:,} parameters (the DRESS subnet at "
                             f"density {d:g}): even one channel per layer holds {slim_params(model, d):,}")
    return model


@torch.no_grad()
def level_slices(model: DressModel, density: float) -> dict[str, tuple[slice, ...]]:
    """The prefix of every learned tensor that the ``density`` level holds, by state-dict key.

    Found by running the level once: each layer records the weight prefix it used. Running statistics are left
    out: a device trains on batch statistics and the server recomputes them per level."""
    was_training, previous = model.training, model.active_density
    model.eval()
    model.set_density(density)
    a = model.arch
    model(torch.zeros(1, a.in_channels, a.image_size, a.image_size))
    slices: dict[str, tuple[slice, ...]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, Slim):
            continue
        prefix = tuple(slice(0, n) for n in m.active_shape)
        if isinstance(m, SlimBatchNorm):
            row = m.active_level if m.affine == "per-density" else 0
            for field in ("weight", "bias"):
                slices[f"{name}.{field}"] = (slice(row, row + 1), *prefix)
            continue
        slices[f"{name}.weight"] = prefix
        if getattr(m, "bias", None) is not None:
            slices[f"{name}.bias"] = prefix[:1]
    model.set_density(previous)
    model.train(was_training)
    return slices


def prefix_tensors(model: DressModel, slices: dict[str, tuple[slice, ...]]) -> dict[str, torch.Tensor]:
    """Copies of the prefixes ``slices`` names (``level_slices``): what a level's payload or reply carries."""
    state = model.state_dict()
    return {key: state[key][where].contiguous() for key, where in slices.items()}


@torch.no_grad()
def load_prefixes(model: DressModel, level: float, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[slice, ...]]:
    """Write the ``level`` prefixes ``tensors`` holds into ``model`` and return their slices; ValueError unless
    ``tensors`` holds exactly those prefixes, shaped so."""
    slices = level_slices(model, level)
    expected = {key: tuple(t.shape) for key, t in prefix_tensors(model, slices).items()}
    got = {key: tuple(t.shape) for key, t in tensors.items()}
    if got != expected:
        raise ValueError(f"holds tensors {got}, expected the level-{level:g} prefixes {expected}")
    state = model.state_dict()
    for key, where in slices.items():
        state[key][where].copy_(tensors[key])
    return slices


def slimmable_like(dress: DressModel) -> DressModel:
    """A slimmable twin (switchable BN) of a DRESS model with equal parameter count per level."""
    return width_twin(dress)
