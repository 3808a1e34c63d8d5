"""Differentiable packed layers: training that touches only a subnet's stored values.

``linear`` and ``conv2d`` run the packed forward kernel and, on backward, the native gradient kernels:
dL/dx through the transposed bands and dL/dvalues only at the stored positions of the bands read. So
``values`` can be an ``nn.Parameter`` that a standard optimizer updates in place (its state is as large as
the packed values, never a dense [rows, cols] weight), and several densities trained in one step add their
gradients into the same buffer: a sparser subnet's bands are a prefix of a denser one's.

Bias, BatchNorm and ReLU stay in torch (training uses batch statistics, not the folded epilogue).
Indices and bands are structure, not learned: they get no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from dress_model.kernels import packed_conv2d, packed_conv2d_backward, packed_linear, packed_linear_backward

__all__ = ["linear", "conv2d"]


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor,
                rows: int) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, values, indices, bands)
        ctx.rows = rows
        return packed_linear(x, values, indices, bands, rows, in_features=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, values, indices, bands = ctx.saved_tensors
        gx, gv = packed_linear_backward(grad.contiguous(), x, values, indices, bands, ctx.rows,
                                        input_grad=ctx.needs_input_grad[0], values_grad=ctx.needs_input_grad[1])
        return gx, gv, None, None, None


class _PackedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor,
                rows: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, values, indices, bands)
        ctx.geometry = (rows, kernel_size, stride, padding)
        return packed_conv2d(x, values, indices, bands, rows, kernel_size, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, values, indices, bands = ctx.saved_tensors
        gx, gv = packed_conv2d_backward(grad.contiguous(), x, values, indices, bands, *ctx.geometry,
                                        input_grad=ctx.needs_input_grad[0], values_grad=ctx.needs_input_grad[1])
        return gx, gv, None, None, None, None, None, None


def linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor, rows: int) -> torch.Tensor:
    """y[B, rows] = x @ W_bands^T, differentiable w.r.t. x and ``values``."""
    return _PackedLinear.apply(x, values, indices, bands, rows)


def conv2d(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor, rows: int,
           kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
           padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """`packed_conv2d` without epilogue, differentiable w.r.t. x and ``values``."""
    return _PackedConv2d.apply(x, values, indices, bands, rows, tuple(kernel_size), tuple(stride), tuple(padding))
