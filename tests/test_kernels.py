"""Packed banded kernels against the dense reference, on every ISA variant this CPU can run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import pack_layer

from dress_model.kernels import (
    best_kernel_isa,
    kernel_isa,
    packed_conv2d,
    packed_linear,
    set_kernel_isa,
    validate_indices,
)
from dress_model.kernels.reference import reference_conv2d, reference_linear
from dress_model.packed_format import band_table, prefix_lengths, unpack_rows
from dress_model.sparsity import keep_count


def make_layer(rows: int, cols: int, densities, *, seed: int = 0, sort: bool = True, index_dtype=None):
    """Random weight, random per-row importance order, and its packed form."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    order = torch.argsort(torch.rand(rows, cols, generator=g), dim=1)
    return w, order, pack_layer(w, order, densities, sort=sort, index_dtype=index_dtype, generator=g)


def masked(w: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """The subnet by definition: each row keeps its k most important weights."""
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, order[:, :k], True)
    return w * keep


def close(y: torch.Tensor, ref: torch.Tensor, terms: int) -> None:
    """fp32 accumulation of `terms` products: error grows ~sqrt(terms)."""
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, math.sqrt(terms)))


@pytest.mark.parametrize("batch", [1, 3, 5, 16, 17, 33])
@pytest.mark.parametrize("rows,cols,densities", [(37, 53, [0.1, 0.5, 1.0]), (64, 129, [0.05, 0.25, 0.5, 1.0]), (3, 7, [0.5])])
def test_linear_every_prefix_matches_reference(isa, batch, rows, cols, densities):
    w, order, (values, indices, bands) = make_layer(rows, cols, densities, seed=batch)
    x = torch.randn(batch, cols)
    for nb, d in enumerate(densities, start=1):
        y = packed_linear(x, values, indices, bands[:nb], rows, threads=2)
        close(y, reference_linear(x, values, indices, bands[:nb], rows), cols)
        close(y, F.linear(x, masked(w, order, keep_count(d, cols))), cols)


def test_linear_k1_and_full_row(isa):
    rows, cols = 9, 41
    w, order, (values, indices, bands) = make_layer(rows, cols, [1 / cols, 1.0])
    assert bands[:, 1].tolist() == [1, cols - 1]
    for batch in (1, 6):
        x = torch.randn(batch, cols)
        close(packed_linear(x, values, indices, bands[:1], rows), F.linear(x, masked(w, order, 1)), 1)
        close(packed_linear(x, values, indices, bands, rows), F.linear(x, w), cols)
        # A caller may also pass a single band: the plain [rows, K] layout.
        single = torch.tensor([[int(bands[1, 0]), cols - 1]])
        close(packed_linear(x, values, indices, single, rows), reference_linear(x, values, indices, single, rows), cols)


@pytest.mark.parametrize("sort", [True, False])
def test_index_order_within_band_does_not_matter(isa, sort):
    rows, cols = 13, 70
    w, order, (values, indices, bands) = make_layer(rows, cols, [0.3, 1.0], sort=sort)
    for batch in (1, 4, 20):
        x = torch.randn(batch, cols)
        close(packed_linear(x, values, indices, bands, rows), F.linear(x, w), cols)


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_index_dtypes(isa, index_dtype):
    rows, cols = 10, 300
    w, order, (values, indices, bands) = make_layer(rows, cols, [0.2, 1.0], index_dtype=index_dtype)
    assert indices.dtype == index_dtype
    for batch in (1, 9):
        x = torch.randn(batch, cols)
        close(packed_linear(x, values, indices, bands[:1], rows), F.linear(x, masked(w, order, 60)), cols)


def test_row_longer_than_int16(isa):
    rows, cols = 3, 40_000
    w, order, (values, indices, bands) = make_layer(rows, cols, [0.01, 0.9])
    assert indices.dtype == torch.int32 and int(indices.max()) > 32767
    for batch in (1, 4):
        x = torch.randn(batch, cols)
        for nb, k in ((1, 400), (2, 36_000)):
            close(packed_linear(x, values, indices, bands[:nb], rows), F.linear(x, masked(w, order, k)), k)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_linear_fused_epilogue(isa, batch):
    rows, cols = 21, 50
    w, order, (values, indices, bands) = make_layer(rows, cols, [0.25, 1.0])
    x = torch.randn(batch, cols)
    bias, scale, shift = torch.randn(rows), torch.rand(rows) + 0.5, torch.randn(rows)
    acc = F.linear(x, masked(w, order, 13))
    close(packed_linear(x, values, indices, bands[:1], rows, bias=bias), acc + bias, cols)
    close(packed_linear(x, values, indices, bands[:1], rows, bias=bias, relu=True), torch.relu(acc + bias), cols)
    y = packed_linear(x, values, indices, bands[:1], rows, scale=scale, shift=shift, relu=True)
    close(y, torch.relu(acc * scale + shift), cols)
    close(packed_linear(x, values, indices, bands[:1], rows, scale=scale), acc * scale, cols)


@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_paths_match_reference(isa, threads):
    """Layers big enough that the kernels really split work across threads (small ones run on one)."""
    rows, cols = 256, 520
    w, order, (values, indices, bands) = make_layer(rows, cols, [0.5, 1.0])
    for batch in (1, 32):
        x = torch.randn(batch, cols)
        close(packed_linear(x, values, indices, bands, rows, threads=threads), F.linear(x, w), cols)
    C, rows = 32, 64
    w, order, (values, indices, bands) = make_layer(rows, C * 9, [0.5, 1.0])
    for batch in (1, 2, 5):  # fewer images than threads, and enough for one image per thread
        x = torch.randn(batch, C, 16, 13)
        y = packed_conv2d(x, values, indices, bands, rows, 3, 1, 1, threads=threads)
        close(y, F.conv2d(x, w.view(rows, C, 3, 3), padding=1), C * 9)
    x = torch.randn(2, C, 16, 16)  # stride-1 1x1 conv read in place
    w, order, (values, indices, bands) = make_layer(256, C, [1.0])
    y = packed_conv2d(x, values, indices, bands, 256, 1, threads=threads)
    close(y, F.conv2d(x, w.view(256, C, 1, 1)), C)


CONV_CASES = [
    # (C, H, W, rows, k, stride, padding)
    (16, 8, 8, 24, 1, 1, 0),
    (5, 7, 9, 6, 1, 1, 0),
    (6, 9, 7, 10, 1, 2, 0),
    (3, 8, 8, 7, 1, 1, 1),
    (4, 11, 6, 9, 3, 1, 1),
    (5, 10, 13, 6, 3, 2, 1),
    (3, 9, 9, 5, 3, 1, 0),
    (7, 12, 17, 11, 3, 2, 2),
    (3, 16, 16, 33, 3, 1, 1),
    (2, 13, 10, 4, 5, 1, 2),
    (3, 15, 12, 5, 5, 2, 2),
    (2, 6, 5, 3, 5, 2, 0),
    (4, 3, 3, 5, 3, 1, 1),
    (2, 40, 37, 3, 3, 1, 1),
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("C,H,W,rows,k,stride,padding", CONV_CASES)
def test_conv_every_prefix_matches_reference(isa, batch, C, H, W, rows, k, stride, padding):
    cols = C * k * k
    densities = [0.1, 0.5, 1.0]
    w, order, (values, indices, bands) = make_layer(rows, cols, densities, seed=H * W + k)
    x = torch.randn(batch, C, H, W)
    for nb, d in enumerate(densities, start=1):
        y = packed_conv2d(x, values, indices, bands[:nb], rows, (k, k), stride, padding, threads=2)
        ref = F.conv2d(x, masked(w, order, keep_count(d, cols)).view(rows, C, k, k), stride=stride, padding=padding)
        close(y, ref, cols)
        close(y, reference_conv2d(x, values, indices, bands[:nb], rows, (k, k), stride, padding), cols)


def test_conv_rectangular_kernel_stride_padding(isa):
    C, rows, kh, kw = 3, 5, 3, 5
    w, order, (values, indices, bands) = make_layer(rows, C * kh * kw, [0.4, 1.0])
    x = torch.randn(2, C, 11, 14)
    y = packed_conv2d(x, values, indices, bands, rows, (kh, kw), (2, 1), (1, 2))
    close(y, F.conv2d(x, w.view(rows, C, kh, kw), stride=(2, 1), padding=(1, 2)), C * kh * kw)


@pytest.mark.parametrize("k,padding", [(1, 0), (3, 1)])
def test_conv_fused_epilogue(isa, k, padding):
    C, rows = 6, 10
    w, order, (values, indices, bands) = make_layer(rows, C * k * k, [0.3, 1.0])
    x = torch.randn(2, C, 8, 8)
    scale, shift, bias = torch.rand(rows) + 0.5, torch.randn(rows), torch.randn(rows)
    acc = F.conv2d(x, masked(w, order, keep_count(0.3, C * k * k)).view(rows, C, k, k), padding=padding)
    y = packed_conv2d(x, values, indices, bands[:1], rows, k, 1, padding, scale=scale, shift=shift, relu=True)
    close(y, torch.relu(acc * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), C * k * k)
    y = packed_conv2d(x, values, indices, bands[:1], rows, k, 1, padding, bias=bias)
    close(y, acc + bias.view(1, -1, 1, 1), C * k * k)


def test_accepts_parameters_and_views():
    """Weights held as nn.Parameter, and contiguous slices of a larger buffer, are read in place."""
    rows, cols = 6, 30
    w, order, (values, indices, bands) = make_layer(rows, cols, [0.5, 1.0])
    store = torch.cat([torch.zeros(3), values])
    x = torch.randn(2, cols, requires_grad=True)
    y = packed_linear(x, torch.nn.Parameter(values), indices, bands, rows)
    close(y, F.linear(x.detach(), w), cols)
    close(packed_linear(x, store[3:], indices, bands, rows), y, cols)


def test_pack_roundtrip_and_widths():
    assert prefix_lengths((0.1, 0.25, 0.5, 1.0), 10) == [1, 3, 5, 10]
    assert prefix_lengths((0.14,), 50) == [7]  # k_d = ceil(d * cols), not pushed over by 0.14 * 50 = 7.000000000000001
    assert band_table([1, 3, 5, 10], 4).tolist() == [[0, 1], [4, 2], [12, 2], [20, 5]]
    w, order, (values, indices, bands) = make_layer(4, 10, [0.1, 0.25, 0.5, 1.0])
    assert torch.equal(unpack_rows(values, indices, bands, 4, 10), w)
    assert bands.tolist() == [[0, 1], [4, 2], [12, 2], [20, 5]]


# ------------------------------------------------------------------------ bad input


@pytest.fixture
def layer():
    _, _, packed = make_layer(8, 20, [0.5, 1.0])
    return packed


def test_rejects_wrong_dtypes(layer):
    values, indices, bands = layer
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="values must be torch.float32"):
        packed_linear(x, values.double(), indices, bands, 8)
    with pytest.raises(ValueError, match="indices must be torch.int16 or torch.int32"):
        packed_linear(x, values, indices.long(), bands, 8)
    with pytest.raises(ValueError, match="bands must be torch.int64"):
        packed_linear(x, values, indices, bands.int(), 8)
    with pytest.raises(ValueError, match="x must be torch.float32"):
        packed_linear(x.half(), values, indices, bands, 8)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        packed_linear(x[0], values, indices, bands, 8)


def test_rejects_non_contiguous(layer):
    values, indices, bands = layer
    with pytest.raises(ValueError, match="x must be contiguous"):
        packed_linear(torch.randn(20, 2).t(), values, indices, bands, 8)
    with pytest.raises(ValueError, match="values must be contiguous"):
        packed_linear(torch.randn(2, 20), torch.randn(2 * values.numel())[::2], indices, bands, 8)
    with pytest.raises(ValueError, match="x must be contiguous"):
        packed_conv2d(torch.randn(1, 8, 8, 20).permute(0, 3, 1, 2), values, indices, bands, 8, 1)


def test_rejects_band_past_buffer_end(layer):
    values, indices, bands = layer
    x = torch.randn(2, 20)
    bad = bands.clone()
    bad[1, 0] += 1
    with pytest.raises(ValueError, match="band 1 .* does not fit"):
        packed_linear(x, values, indices, bad, 8)
    with pytest.raises(ValueError, match="does not fit"):
        packed_linear(x, values, indices, bands, 9)  # more rows than packed
    with pytest.raises(ValueError, match="negative|does not fit"):
        packed_linear(x, values, indices, torch.tensor([[-1, 2]]), 8)
    with pytest.raises(ValueError, match="indices has"):
        packed_linear(x, values, indices[:-1], bands, 8)
    with pytest.raises(ValueError, match=r"bands must be \[nb, 2\]"):
        packed_linear(x, values, indices, bands.view(-1), 8)


def test_rejects_out_of_range_index(layer):
    values, indices, bands = layer
    x = torch.randn(3, 20)
    for bad_value in (20, -1):
        bad = indices.clone()
        bad[17] = bad_value
        with pytest.raises(ValueError, match=rf"indices\[17\] = {bad_value} is outside"):
            packed_linear(x, values, bad, bands, 8, check_indices=True)
        with pytest.raises(ValueError, match=rf"indices\[17\] = {bad_value} is outside"):
            validate_indices(bad, bands, 8, 20)
    validate_indices(indices, bands, 8, 20)
    # Only the bands actually read are scanned.
    bad = indices.clone()
    bad[-1] = 99
    packed_linear(x, values, bad, bands[:1], 8, check_indices=True)


def test_rejects_wrong_input_size(layer):
    values, indices, bands = layer
    with pytest.raises(ValueError, match="bands hold 20 entries per row but the input has only 12"):
        packed_linear(torch.randn(2, 12), values, indices, bands, 8)
    with pytest.raises(ValueError, match="x has 21 features, layer expects 20"):
        packed_linear(torch.randn(2, 21), values, indices, bands, 8, in_features=20)
    # conv: 20 columns = 5 channels x 2x2 kernel
    x = torch.randn(1, 5, 6, 6)
    close(packed_conv2d(x, values, indices, bands, 8, 2), reference_conv2d(x, values, indices, bands, 8, (2, 2)), 20)
    with pytest.raises(ValueError, match="x has 4 channels, layer expects 5"):
        packed_conv2d(torch.randn(1, 4, 6, 6), values, indices, bands, 8, 2, in_channels=5)
    with pytest.raises(ValueError, match="bands hold 20 entries per row but the input has only 16"):
        packed_conv2d(torch.randn(1, 4, 6, 6), values, indices, bands, 8, 2)
    with pytest.raises(ValueError, match="smaller than the 2x2 kernel"):
        packed_conv2d(torch.randn(1, 5, 1, 6), values, indices, bands, 8, 2)


def test_rejects_bad_epilogue_and_threads(layer):
    values, indices, bands = layer
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="either bias or shift"):
        packed_linear(x, values, indices, bands, 8, bias=torch.zeros(8), shift=torch.zeros(8))
    with pytest.raises(ValueError, match=r"scale must have shape \[8\]"):
        packed_linear(x, values, indices, bands, 8, scale=torch.ones(7))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        packed_linear(x, values, indices, bands, 8, threads=0)
    with pytest.raises(ValueError, match="kernel_size/stride"):
        packed_conv2d(torch.randn(1, 5, 6, 6), values, indices, bands, 8, 2, stride=0)


def test_isa_switching():
    assert kernel_isa() == best_kernel_isa()
    with pytest.raises(ValueError, match="unknown ISA"):
        set_kernel_isa("sve9")
    set_kernel_isa("generic")
    assert kernel_isa() == "generic"
    set_kernel_isa()
    assert kernel_isa() == best_kernel_isa()
