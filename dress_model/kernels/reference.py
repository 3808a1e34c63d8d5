"""Dense reference for the packed banded layout: the ground truth the native kernels are tested against.

torch's own float64 linear and conv on the weight the bands hold, then the kernels' fused epilogue. Packing
is production's (``dress_model.packed_format.pack_rows``): tests and benchmarks use the format the fleet runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dress_model.packed_format import unpack_rows


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
    w = unpack_rows(values, indices, bands, rows, x.shape[1])
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
    w = unpack_rows(values, indices, bands, rows, c * kh * kw).view(rows, c, kh, kw)
    y = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)
    return _epilogue(y, bias, scale, shift, relu, (1, -1, 1, 1)).float()
