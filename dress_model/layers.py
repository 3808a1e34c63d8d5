"""DRESS building blocks: row-sparse Linear/Conv2d and batch norm with per-density statistics.

Every module here follows the model's *active density* (set by ``DressModel.set_density``). The sparse layers
multiply their weight by the nested prefix mask of that density, so one set of weights trains every subnet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dress_model.sparsity import Importance, keep_count, magnitude, order_to_rank, prefix_mask, row_order


class DensityCell:
    """The active density index, one object shared by every module of a model: switching is one store."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class DensityAware:
    """Mixin for a module whose behaviour depends on which of the model's densities is active."""

    densities: tuple[float, ...]
    _cell: DensityCell

    def _init_density(self, densities: tuple[float, ...]) -> None:
        self.densities = densities
        self._cell = DensityCell(len(densities) - 1)

    def share_cell(self, cell: DensityCell) -> None:
        self._cell = cell

    @property
    def active_level(self) -> int:
        return self._cell.index

    @active_level.setter
    def active_level(self, index: int) -> None:
        self._cell.index = index

    @property
    def active_density(self) -> float:
        return self.densities[self.active_level]


class RowSparse(DensityAware):
    """Mixin for a weight whose 2-D view [out, rest] is pruned row by row to the active density.

    ``order`` (int32 [rows, cols]) is the per-row importance order; it is a buffer so checkpoints carry it.
    Masks are derived from it and cached per keep-count.
    """

    weight: nn.Parameter

    def _init_row_sparse(self, densities: tuple[float, ...]) -> None:
        self._init_density(densities)
        rows = self.weight.shape[0]
        cols = self.weight[0].numel()
        # On the meta device (shapes only: a packed file's check) arange would import torch's symbolic shapes
        # (seconds on a small device); an empty order has the shape and nothing to rank.
        self.register_buffer("order", torch.empty(rows, cols, dtype=torch.int32) if self.weight.is_meta
                             else torch.arange(cols, dtype=torch.int32).repeat(rows, 1))
        self._masks: dict[int, torch.Tensor] = {}
        self.rerank()

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.weight[0].numel()

    def keep(self, density: float | None = None) -> int:
        return keep_count(self.active_density if density is None else density, self.cols)

    def weight2d(self) -> torch.Tensor:
        return self.weight.reshape(self.rows, self.cols)

    @torch.no_grad()
    def rerank(self, importance: Importance = magnitude) -> None:
        """Re-sample the per-row order from the current weights (the paper's row-based re-sampling)."""
        if self.weight.is_meta:
            return
        self.order.copy_(row_order(self.weight2d(), importance).to(torch.int32))
        self._masks.clear()

    def mask(self, density: float | None = None) -> torch.Tensor:
        """Float {0,1} mask shaped like the weight, keeping the top-k of every row."""
        k = self.keep(density)
        cached = self._masks.get(k)
        if cached is None or cached.device != self.weight.device:
            rank = order_to_rank(self.order.long())
            cached = prefix_mask(rank, k).to(self.weight.dtype).reshape(self.weight.shape)
            self._masks[k] = cached
        return cached

    def cached_masks(self) -> list[torch.Tensor]:
        """The masks built so far (memory a training step holds besides the weights)."""
        return list(self._masks.values())

    def clear_masks(self) -> None:
        """Forget the cached masks: after the densities or the order were changed by hand."""
        self._masks.clear()

    def masked_weight(self) -> torch.Tensor:
        if self.keep() == self.cols:
            return self.weight
        return self.weight * self.mask()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._masks.clear()


class DressLinear(RowSparse, nn.Linear):
    """nn.Linear whose rows keep only the active density's most important weights."""

    def __init__(self, in_features: int, out_features: int, densities: tuple[float, ...], bias: bool = True) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_row_sparse(densities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class DressConv2d(RowSparse, nn.Conv2d):
    """nn.Conv2d whose output channels keep only the active density's most important weights."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        densities: tuple[float, ...],
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_row_sparse(densities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class DensityBatchNorm(DensityAware, nn.Module):
    """Batch norm with running statistics per density, and affine parameters per density or shared.

    A sparser subnet sees different activation statistics, so one set of running stats cannot serve all
    densities. ``affine="per-density"`` is switchable BN (Slimmable-style); ``affine="shared"`` keeps one
    scale/shift and relies on per-density statistics alone (filled during training, optionally recalibrated
    after it). Works on [B, C] and [B, C, H, W].
    """

    def __init__(
        self, num_features: int, densities: tuple[float, ...], affine: str = "per-density", momentum: float = 0.1
    ) -> None:
        nn.Module.__init__(self)
        self._init_density(densities)
        if affine not in ("per-density", "shared"):
            raise ValueError(f"BN affine must be 'per-density' or 'shared', got {affine!r}")
        n = len(densities) if affine == "per-density" else 1
        self.affine = affine
        self.momentum: float | None = momentum
        self.eps = 1e-5
        self.weight = nn.Parameter(torch.ones(n, num_features))
        self.bias = nn.Parameter(torch.zeros(n, num_features))
        self.register_buffer("running_mean", torch.zeros(len(densities), num_features))
        self.register_buffer("running_var", torch.ones(len(densities), num_features))
        self.register_buffer("num_batches", torch.zeros(len(densities), dtype=torch.long))
        self.folded = False  # set by the packed runtime when a kernel applies this BN as its epilogue

    def scale_shift(self, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference-time BN as y = scale * x + shift for one density (what the packed kernel fuses)."""
        i = self.active_level if index is None else index
        a = i if self.affine == "per-density" else 0
        scale = self.weight[a] / torch.sqrt(self.running_var[i] + self.eps)
        return scale, self.bias[a] - self.running_mean[i] * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return x
        return self.normalize(x, self.weight.shape[1])

    def normalize(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """Batch norm of ``x`` with the active density's statistics and affine over the first ``channels``
        features (all of them here; a width-nested subclass passes its active width)."""
        i = self.active_level
        a = i if self.affine == "per-density" else 0
        momentum = self.momentum
        if self.training:
            self.num_batches[i] += 1
            if momentum is None:  # cumulative average, used for recalibration
                momentum = 1.0 / float(self.num_batches[i])
        return F.batch_norm(
            x,
            self.running_mean[i, :channels],
            self.running_var[i, :channels],
            self.weight[a, :channels],
            self.bias[a, :channels],
            self.training,
            momentum if momentum is not None else 0.0,
            self.eps,
        )
