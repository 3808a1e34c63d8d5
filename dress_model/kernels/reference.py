"""Dense reference for the packed banded layout: the ground truth the native kernels are tested against.

Also holds `pack_banded`, a straightforward packer used by tests and benchmarks to produce the
layout from a dense weight and a per-row importance order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def band_widths(densities: Sequence[float], cols: int) -> list[int]:
    """Band i holds each row's entries k_{i-1}..k_i - 1 with k_i = ceil(d_i * cols)."""
    ks = [min(cols, math.ceil(d * cols)) for d in densities]
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"densities {list(densities)} give non-increasing prefix lengths {ks} for {cols} columns")
    return [b - a for a, b in zip([0] + ks, ks)]


def pack_banded(
    weight2d: torch.Tensor,
    order: torch.Tensor,
    densities: Sequence[float],
    *,
    sort_within_band: bool = True,
    index_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packs `weight2d` [rows, cols] with per-row importance `order` [rows, cols] into (values, indices, bands).

    Sorting each row's indices inside a band keeps the kernels' input reads ascending (better locality);
    the result is identical either way.
    """
    rows, cols = weight2d.shape
    if index_dtype is None:
        index_dtype = torch.int16 if cols <= 32767 else torch.int32
    vals, idxs, bands, start, off = [], [], [], 0, 0
    for w in band_widths(densities, cols):
        idx = order[:, start : start + w]
        if sort_within_band:
            idx = idx.sort(dim=1).values
        vals.append(weight2d.gather(1, idx).reshape(-1))
        idxs.append(idx.reshape(-1))
        bands.append((off, w))
        start, off = start + w, off + rows * w
    values = torch.cat(vals).to(torch.float32).contiguous()
    indices = torch.cat(idxs).to(index_dtype).contiguous()
    return values, indices, torch.tensor(bands, dtype=torch.int64).reshape(-1, 2)


def dense_weight(values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Rebuilds the [rows, cols] weight that the given bands represent (zeros elsewhere)."""
    w = torch.zeros(rows, cols, dtype=torch.float32)
    for off, width in bands.tolist():
        if width == 0:
            continue
        v = values[off : off + rows * width].reshape(rows, width)
        i = indices[off : off + rows * width].reshape(rows, width).long()
        w.scatter_add_(1, i, v)
    return w


def _epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    relu: bool,
    view: tuple[int, ...],
) -> torch.Tensor:
    """act((y + bias) * scale + shift) with per-row vectors broadcast along `view`."""
    if bias is not None:
        y = y + bias.view(view)
    if scale is not None:
        y = y * scale.view(view)
    if shift is not None:
        y = y + shift.view(view)
    return torch.relu(y) if relu else y


def reference_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bands: torch.Tensor,
    rows: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """F.linear on the rebuilt dense weight, then the same epilogue as `packed_linear`."""
    w = dense_weight(values, indices, bands, rows, x.shape[1])
    return _epilogue(F.linear(x.double(), w.double()), bias, scale, shift, relu, (1, -1)).float()


def reference_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bands: torch.Tensor,
    rows: int,
    kernel_size: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """F.conv2d on the rebuilt dense weight (column c*kh*kw + i*kw + j), then the fused epilogue."""
    kh, kw = kernel_size
    c = x.shape[1]
    w = dense_weight(values, indices, bands, rows, c * kh * kw).view(rows, c, kh, kw)
    y = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)
    return _epilogue(y, bias, scale, shift, relu, (1, -1, 1, 1)).float()
