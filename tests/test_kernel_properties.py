"""Property tests: the packed kernels against torch's dense ops on the masked weight, in float64.

Every input comes from hypothesis: kernel sizes (non-square too), strides and paddings that differ per axis,
tiny and odd inputs, batch, rows, channels, densities, band order inside a band, int16 and int32 indices,
every ISA this CPU runs, 1 and 2 threads. The weights are packed by production's packer (dress_model.packed),
so the tests check the format the fleet stores, sends and runs.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import ISAS, pack_layer

from dress_model.kernels import (
    packed_conv2d,
    packed_conv2d_backward,
    packed_linear,
    packed_linear_backward,
    set_kernel_isa,
)
from dress_model.packed_format import prefix_lengths

# The same 150 cases on every run (CI stays deterministic); DRESS_PROPERTY_EXAMPLES=2000 hunts wider, at random.
HUNT = int(os.environ.get("DRESS_PROPERTY_EXAMPLES", "0"))
EXAMPLES = settings(max_examples=HUNT or 150, deadline=None, derandomize=not HUNT)


@st.composite
def packed_layers(draw: st.DrawFn, rows: int, cols: int) -> dict:
    """A random weight, its importance order and a random nested density list, packed for the kernel."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    order = torch.argsort(torch.rand(rows, cols, generator=g), dim=1)
    densities = sorted(set(draw(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4))))
    ks = prefix_lengths(tuple(densities), cols)  # equal k for close densities: an empty band, which must work
    values, indices, bands = pack_layer(weight, order, densities, sort=draw(st.booleans()),
                                        index_dtype=draw(st.sampled_from([None, torch.int32])), generator=g)
    prefix = draw(st.integers(1, len(ks)))  # the subnet the call runs: a prefix of the bands
    return {"weight": weight, "order": order, "k": ks[prefix - 1], "values": values, "indices": indices,
            "bands": bands[:prefix].contiguous()}


def masked(layer: dict) -> torch.Tensor:
    """The subnet by definition: each row keeps its k most important weights (float64)."""
    keep = torch.zeros_like(layer["weight"], dtype=torch.bool).scatter_(1, layer["order"][:, : layer["k"]], True)
    return layer["weight"] * keep


def assert_close(y: torch.Tensor, ref: torch.Tensor, terms: int) -> None:
    """fp32 accumulation of ``terms`` products against float64: error grows ~sqrt(terms)."""
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5 * max(1.0, math.sqrt(terms)) * 4)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 13))
    w = draw(st.integers(max(1, kw - 2 * pw), 13))
    channels, rows, batch = draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.integers(1, 3))
    layer = draw(packed_layers(rows, channels * kh * kw))
    return {"kernel": (kh, kw), "stride": (sh, sw), "padding": (ph, pw), "shape": (batch, channels, h, w),
            "rows": rows, "layer": layer, "isa": draw(st.sampled_from(ISAS)), "threads": draw(st.sampled_from([1, 2])),
            "seed": draw(st.integers(0, 2**31 - 1))}


@EXAMPLES
@given(conv_cases())
def test_packed_conv2d_equals_conv2d_on_the_masked_weight(case: dict) -> None:
    layer, (kh, kw) = case["layer"], case["kernel"]
    batch, channels, h, w = case["shape"]
    x = torch.randn(case["shape"], generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    set_kernel_isa(case["isa"])
    try:
        y = packed_conv2d(x.float(), layer["values"].float(), layer["indices"], layer["bands"], case["rows"],
                          case["kernel"], case["stride"], case["padding"], threads=case["threads"],
                          in_channels=channels, check_indices=True)
    finally:
        set_kernel_isa()
    ref = F.conv2d(x, masked(layer).view(case["rows"], channels, kh, kw), stride=case["stride"],
                   padding=case["padding"])
    assert y.shape == ref.shape
    assert_close(y, ref, layer["k"])


@st.composite
def linear_cases(draw: st.DrawFn) -> dict:
    cols, rows, batch = draw(st.integers(1, 300)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return {"rows": rows, "batch": batch, "layer": draw(packed_layers(rows, cols)), "cols": cols,
            "isa": draw(st.sampled_from(ISAS)), "threads": draw(st.sampled_from([1, 2])),
            "seed": draw(st.integers(0, 2**31 - 1))}


@EXAMPLES
@given(linear_cases())
def test_packed_linear_equals_linear_on_the_masked_weight(case: dict) -> None:
    layer = case["layer"]
    x = torch.randn(case["batch"], case["cols"], generator=torch.Generator().manual_seed(case["seed"]),
                    dtype=torch.float64)
    set_kernel_isa(case["isa"])
    try:
        y = packed_linear(x.float(), layer["values"].float(), layer["indices"], layer["bands"], case["rows"],
                          threads=case["threads"], in_features=case["cols"], check_indices=True)
    finally:
        set_kernel_isa()
    assert_close(y, F.linear(x, masked(layer)), layer["k"])


def _values_grad_of(dense_grad: torch.Tensor, layer: dict, rows: int) -> torch.Tensor:
    """dL/dvalues from dL/dW of the masked dense layer: W's gradient at each stored position read, 0 elsewhere."""
    grad = torch.zeros(layer["values"].shape[0], dtype=torch.float64)
    for offset, width in layer["bands"].tolist():
        cols = layer["indices"][offset : offset + rows * width].long().reshape(rows, width)
        grad[offset : offset + rows * width] = dense_grad.reshape(rows, -1).gather(1, cols).reshape(-1)
    return grad


@EXAMPLES
@given(conv_cases())
def test_packed_conv2d_backward_equals_autograd_of_the_masked_conv2d(case: dict) -> None:
    layer, (kh, kw), rows = case["layer"], case["kernel"], case["rows"]
    batch, channels, h, w = case["shape"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["shape"], generator=g, dtype=torch.float64, requires_grad=True)
    weight = masked(layer).view(rows, channels, kh, kw).requires_grad_()
    ref = F.conv2d(x, weight, stride=case["stride"], padding=case["padding"])
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(grad_out)
    set_kernel_isa(case["isa"])
    try:
        gx, gv = packed_conv2d_backward(grad_out.float(), x.detach().float(), layer["values"].float(),
                                        layer["indices"], layer["bands"], rows, case["kernel"], case["stride"],
                                        case["padding"], threads=case["threads"], check_indices=True)
    finally:
        set_kernel_isa()
    assert_close(gx, x.grad, rows * layer["k"])
    assert_close(gv, _values_grad_of(weight.grad, layer, rows), batch * ref.shape[2] * ref.shape[3])


@EXAMPLES
@given(linear_cases())
def test_packed_linear_backward_equals_autograd_of_the_masked_linear(case: dict) -> None:
    layer, rows = case["layer"], case["rows"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], case["cols"], generator=g, dtype=torch.float64, requires_grad=True)
    weight = masked(layer).requires_grad_()
    grad_out = torch.randn(case["batch"], rows, generator=g, dtype=torch.float64)
    F.linear(x, weight).backward(grad_out)
    set_kernel_isa(case["isa"])
    try:
        gx, gv = packed_linear_backward(grad_out.float(), x.detach().float(), layer["values"].float(),
                                        layer["indices"], layer["bands"], rows, threads=case["threads"],
                                        check_indices=True)
    finally:
        set_kernel_isa()
    assert_close(gx, x.grad, rows * layer["k"])
    assert_close(gv, _values_grad_of(weight.grad, layer, rows), case["batch"])
