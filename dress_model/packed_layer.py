"""One sparse layer executed from its packed buffers (``dress_model.packed_format``) by the native kernel, its BN
(and ReLU) fused; in training mode, differentiable through the packed ops with ``values`` as its parameter.

Full density at dense cost: a layer whose top band completes every row runs that subnet as a dense layer
(F.conv2d / F.linear on the weight rebuilt at load, BN folded in), faster than any sparse kernel at 100 %
density, and trains it as a dense layer on the values gathered into place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dress_model import kernels
from dress_model.kernels import autograd as packed_ops
from dress_model.layers import DensityAware, DensityBatchNorm, DressConv2d, RowSparse
from dress_model.packed_format import band_table, index_dtype_for, prefix_lengths, stored_index_count, unpack_rows


class PackedSparse(DensityAware, nn.Module):
    """A sparse layer executed from its packed buffers by the native kernel, BN (and ReLU) fused."""

    def __init__(self, layer: RowSparse, densities: tuple[float, ...]) -> None:
        nn.Module.__init__(self)
        self._init_density(densities)
        self.rows, self.cols = layer.rows, layer.cols
        self.is_conv = isinstance(layer, DressConv2d)
        if self.is_conv:
            conv: nn.Conv2d = layer  # type: ignore[assignment]
            self.in_channels, self.kernel_size = conv.in_channels, conv.kernel_size
            self.stride, self.padding = conv.stride, conv.padding
        else:
            self.in_channels = layer.cols
        ks = prefix_lengths(densities, self.cols)
        self.full_top = ks[-1] == self.cols  # the top band completes every row: no stored indices, run dense
        self.stored_indices = stored_index_count(ks, self.rows, self.cols)
        self.register_buffer("bands", band_table(ks, self.rows))
        n = self.rows * ks[-1]
        # Parameters, so training updates the packed values in place; they require grad only in training
        # mode (PackedModel.train), so inference and in-place edits never meet autograd.
        self.values = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)
        self.register_buffer("indices", torch.zeros(n, dtype=index_dtype_for(self.cols)))
        self.bias = None if layer.bias is None else nn.Parameter(torch.zeros(self.rows), requires_grad=False)
        self._norm: list[DensityBatchNorm] = []  # a list so the BN stays registered where the model put it
        self._views: list[torch.Tensor] = []
        self._epilogue: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self._dense: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the full top band's dense layer
        self._placement: torch.Tensor | None = None  # training a full top band: values index per dense weight

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """The layer's weight shape as torch's dense conv / linear takes it."""
        return (self.rows, self.in_channels, *self.kernel_size) if self.is_conv else (self.rows, self.cols)

    def entries(self, index: int) -> int:
        """Stored entries the subnet at density index ``index`` reads: rows * k_index."""
        offset, width = self.bands[index].tolist()
        return offset + self.rows * width

    @property
    def norm(self) -> DensityBatchNorm | None:
        """The BN folded into this layer's epilogue, if any."""
        return self._norm[0] if self._norm else None

    @property
    def runs_dense(self) -> bool:
        """Whether its full top subnet runs as a dense layer now (inference on a layer stored up to d=1)."""
        return self._dense is not None

    @property
    def placement(self) -> torch.Tensor | None:
        """Training a full top band: for each dense weight, the stored entry holding it (None until built)."""
        return self._placement

    def view(self, index: int) -> torch.Tensor:
        """The band table of the subnet at density index ``index`` (its first ``index + 1`` bands)."""
        return self._views[index]

    def epilogue(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-row (scale, shift) the kernel applies at density index ``index``: folded BN and bias."""
        return self._epilogue[index]

    def set_mode(self, training: bool) -> None:
        """Training: BN unfolded, values (and bias) trainable, no dense copy; inference: the reverse, its
        placement dropped (``PackedModel.train`` then re-finalizes)."""
        if self._norm:
            self._norm[0].folded = not training
        for p in (self.values, self.bias):
            if p is not None:
                p.requires_grad_(training)
        if training:
            self._dense = None  # the inference-only dense copy of a full top band: rebuilt on eval
        else:
            self._placement = None  # training-only

    def fuse(self, norm: DensityBatchNorm) -> None:
        """Fold ``norm`` into this layer's epilogue; the BN module itself then passes its input through."""
        norm.folded = True
        self._norm = [norm]

    @torch.no_grad()
    def finalize(self) -> None:
        """Precompute per-density band views and folded BN so forward and switching allocate nothing."""
        self._views = [self.bands[: i + 1] for i in range(len(self.densities))]
        self._epilogue = []
        for i in range(len(self.densities)):
            if not self._norm:
                self._epilogue.append((None, None))
                continue
            scale, shift = self._norm[0].scale_shift(i)
            if self.bias is not None:
                shift = shift + scale * self.bias
            self._epilogue.append((scale.contiguous(), shift.contiguous()))
        self._dense = None
        if self.full_top:  # the top subnet as a dense layer, its BN folded into weight and bias
            weight = unpack_rows(self.values, self.indices, self.bands, self.rows, self.cols)
            scale, shift = self._epilogue[-1]
            if scale is not None:
                weight, bias = weight * scale[:, None], shift
            else:
                bias = self.bias
            self._dense = (weight.reshape(self.dense_shape).contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.active_level
        if self.training:
            return self._forward_train(x, i)
        if self._dense is not None and i == len(self._epilogue) - 1:
            return self._forward_dense(x)
        scale, shift = self._epilogue[i]
        bias = self.bias if scale is None else None
        x = x.contiguous()
        if self.is_conv:
            return kernels.packed_conv2d(
                x, self.values, self.indices, self._views[i], self.rows, self.kernel_size,
                self.stride, self.padding, bias=bias, scale=scale, shift=shift, in_channels=self.in_channels,
            )  # fmt: skip
        # The input's size is checked on every call (nanoseconds): the stored indices address the layer's
        # columns, and a narrower input would have the kernel read past it.
        return kernels.packed_linear(
            x, self.values, self.indices, self._views[i], self.rows, bias=bias, scale=scale, shift=shift,
            in_features=self.cols,
        )

    def _forward_train(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The subnet's first ``i + 1`` bands, differentiable w.r.t. x, values and bias; BN follows unfolded.

        A full top band holds every weight of the layer, permuted: that subnet trains as a dense layer on the
        values gathered into place (the gradient scatters back onto them), as fast as dense training and no
        larger than the values themselves; the sparser subnets train through the packed kernels."""
        if self.full_top and i == len(self.densities) - 1:
            if self._placement is None:  # for each dense position, the stored entry that holds its weight
                rows = torch.cat([torch.arange(self.rows).repeat_interleave(w) for _, w in self.bands.tolist()])
                at = rows * self.cols + self.indices.long()  # entry e's dense position, entries in stored order
                self._placement = torch.empty(at.numel(), dtype=torch.int32).scatter_(  # as large as the values
                    0, at, torch.arange(at.numel(), dtype=torch.int32))
            weight = self.values[self._placement].view(self.dense_shape)
            if self.is_conv:
                return F.conv2d(x, weight, self.bias, self.stride, self.padding)
            return F.linear(x, weight, self.bias)
        bands = self.bands[: i + 1]
        if self.is_conv:
            y = packed_ops.conv2d(x, self.values, self.indices, bands, self.rows, self.kernel_size, self.stride,
                                  self.padding)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        y = packed_ops.linear(x, self.values, self.indices, bands, self.rows)
        return y if self.bias is None else y + self.bias

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._dense  # type: ignore[misc]
        width = self.in_channels
        if x.dim() < 2 or x.shape[1 if self.is_conv else -1] != width:  # the packed path's error, not torch's
            raise ValueError(f"input must have {width} {'channels' if self.is_conv else 'features'}, "
                             f"got shape {list(x.shape)}")
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        return F.linear(x, weight, bias)
