"""Training through the packed format: the native backward kernels and the differentiable ops over them.

The property tests (test_kernel_properties.py) check every geometry on small shapes against float64 autograd
of the masked dense layer; here: layers big enough to split across threads, torch.autograd.gradcheck, what
the values' gradient holds outside the bands read, bad input, and an optimizer training packed values.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import pack_layer
from torch.utils.data import DataLoader, TensorDataset

import dress_model.packed as packed_module
import dress_model.packed_layer as packed_layer
from dress_model.kernels import autograd, packed_conv2d_backward, packed_linear_backward
from dress_model.layers import RowSparse
from dress_model.models import Architecture, create_model
from dress_model.packed import PackedModel
from dress_model.training import TrainConfig, train


def layer(rows: int, cols: int, densities: list[float], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    order = torch.argsort(torch.rand(rows, cols, generator=g), dim=1)
    return pack_layer(weight, order, densities)


def dense_weight(values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The masked dense weight, differentiable w.r.t. ``values`` (the reference's parametrisation)."""
    flat = torch.zeros(rows * cols, dtype=values.dtype)
    for offset, width in bands.tolist():
        cols_of = indices[offset : offset + rows * width].long().reshape(rows, width)
        at = (torch.arange(rows)[:, None] * cols + cols_of).reshape(-1)
        flat = flat.index_put((at,), values[offset : offset + rows * width], accumulate=True)
    return flat.reshape(rows, cols)


def close(y: torch.Tensor, ref: torch.Tensor, terms: int) -> None:
    torch.testing.assert_close(y.double(), ref.double(), rtol=1e-4, atol=1e-4 * max(1.0, math.sqrt(terms)))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_big_layers_split_across_threads_match_autograd(isa, threads):
    rows, cols, batch = 256, 520, 64
    values, indices, bands = layer(rows, cols, [0.25, 1.0])
    v = values.double().requires_grad_()
    x = torch.randn(batch, cols, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(batch, rows, dtype=torch.float64)
    F.linear(x, dense_weight(v, indices, bands[:1], rows, cols)).backward(grad_out)
    gx, gv = packed_linear_backward(grad_out.float(), x.detach().float(), values, indices, bands[:1], rows,
                                    threads=threads)
    close(gx, x.grad, rows)
    close(gv, v.grad, batch)

    C, rows = 32, 64
    values, indices, bands = layer(rows, C * 9, [0.1, 0.5, 1.0], seed=1)
    for batch in (1, 2, 5):  # fewer images than threads, and more
        v = values.double().requires_grad_()
        x = torch.randn(batch, C, 16, 13, dtype=torch.float64, requires_grad=True)
        y = F.conv2d(x, dense_weight(v, indices, bands[:2], rows, C * 9).view(rows, C, 3, 3), padding=1)
        grad_out = torch.randn(y.shape, dtype=torch.float64)
        y.backward(grad_out)
        gx, gv = packed_conv2d_backward(grad_out.float(), x.detach().float(), values, indices, bands[:2], rows,
                                        3, 1, 1, threads=threads)
        close(gx, x.grad, rows * 9)
        close(gv, v.grad, batch * 16 * 13)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_on_small_layers():
    """torch's own finite-difference check of both ops (float32 kernels: loose tolerances)."""
    values, indices, bands = layer(4, 2 * 3 * 2, [0.3, 1.0])
    x = torch.randn(2, 2, 5, 4, requires_grad=True)
    v = values.clone().requires_grad_()
    conv = lambda x, v: autograd.conv2d(x, v, indices, bands[:1], 4, (3, 2), (2, 1), (1, 0))  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, v), eps=1e-2, atol=5e-3, rtol=5e-3)
    values, indices, bands = layer(3, 7, [0.5, 1.0])
    x = torch.randn(5, 7, requires_grad=True)
    v = values.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v: autograd.linear(x, v, indices, bands, 3), (x, v), eps=1e-2,
                                    atol=5e-3, rtol=5e-3)


def test_values_outside_the_bands_read_get_no_gradient_and_skipped_grads_are_none():
    rows, cols = 8, 40
    values, indices, bands = layer(rows, cols, [0.25, 0.5, 1.0])
    x, grad_out = torch.randn(3, cols), torch.randn(3, rows)
    gx, gv = packed_linear_backward(grad_out, x, values, indices, bands[:2], rows, input_grad=False)
    read = int(bands[1, 0] + rows * bands[1, 1])
    assert gx is None and gv is not None
    assert gv[:read].abs().min() > 0 and not gv[read:].any()
    gx, gv = packed_linear_backward(grad_out, x, values, indices, bands[:2], rows, values_grad=False)
    assert gv is None and gx.shape == x.shape


def test_joint_densities_add_their_gradients_into_one_buffer():
    """A sparser subnet is a prefix of a denser one: two losses, one backward, gradients summed per entry."""
    rows, cols = 6, 30
    values, indices, bands = layer(rows, cols, [0.2, 1.0])
    x = torch.randn(4, cols)
    v = values.clone().requires_grad_()
    (autograd.linear(x, v, indices, bands[:1], rows).square().sum()
     + autograd.linear(x, v, indices, bands, rows).square().sum()).backward()
    expected = torch.zeros_like(values)
    for nb in (1, 2):
        w = values.clone().requires_grad_()
        autograd.linear(x, w, indices, bands[:nb], rows).square().sum().backward()
        expected += w.grad
    close(v.grad, expected, 8)


def test_sgd_on_packed_values_fits_a_target():
    """A standard optimizer trains the packed values in place; the loss falls as with a dense layer."""
    torch.manual_seed(0)
    rows, C = 8, 3
    values, indices, bands = layer(rows, C * 9, [0.5, 1.0])
    v = torch.nn.Parameter(values.clone() * 0.1)
    teacher = torch.randn(rows, C, 3, 3)
    opt = torch.optim.SGD([v], lr=0.05, momentum=0.9)
    x = torch.randn(16, C, 8, 8)
    target = F.conv2d(x, teacher, padding=1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(autograd.conv2d(x, v, indices, bands, rows, (3, 3), (1, 1), (1, 1)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert opt.state[v]["momentum_buffer"].shape == values.shape  # optimizer state: packed, not dense


def test_bad_gradient_input_is_refused():
    rows, cols = 4, 10
    values, indices, bands = layer(rows, cols, [1.0])
    x = torch.randn(2, cols)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape \[2, 4\]"):
        packed_linear_backward(torch.randn(2, 5), x, values, indices, bands, rows)
    with pytest.raises(ValueError, match="grad_out must be torch.float32"):
        packed_linear_backward(torch.randn(2, 4, dtype=torch.float64), x, values, indices, bands, rows)
    with pytest.raises(ValueError, match="only 9 columns"):
        packed_linear_backward(torch.randn(2, 4), torch.randn(2, 9), values, indices, bands, rows)
    values, indices, bands = layer(rows, 2 * 9, [1.0])
    with pytest.raises(ValueError, match=r"shape \[1, 4, 4, 4\]"):
        packed_conv2d_backward(torch.randn(1, 4, 3, 3), torch.randn(1, 2, 4, 4), values, indices, bands, rows, 3,
                               1, 1)


def _train_both_ways(level: float, distill: float) -> tuple[PackedModel, PackedModel, dict[float, float]]:
    """The same subnet trained through the packed format and as a masked dense model, same seeds."""
    torch.manual_seed(0)
    model = create_model(Architecture(name="cnn", densities=(0.1, 0.25, 0.5, 1.0)))
    packed = PackedModel.from_dress(copy.deepcopy(model).eval(), max_density=level)
    data = TensorDataset(torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,)))
    config = TrainConfig(epochs=2, lr=0.05, distill=distill, rerank_every=0, recalibrate_batches=0)
    masked = packed.to_dress()
    torch.manual_seed(1)
    train(masked, DataLoader(data, batch_size=16), config)
    torch.manual_seed(1)
    losses = train(packed, DataLoader(data, batch_size=16), config)
    return packed.eval(), PackedModel.from_dress(masked.eval()), losses


@pytest.mark.parametrize("level,distill", [(0.25, 0.0), (1.0, 0.5)])
def test_training_the_packed_model_equals_dense_masked_training(level, distill):
    """The device's path (packed values, joint densities, anchor loss) lands where masked dense training does."""
    packed, reference, losses = _train_both_ways(level, distill)
    assert set(losses) == {d for d in (0.1, 0.25, 0.5, 1.0) if d <= level}
    ours, theirs = packed.net.state_dict(), reference.net.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4, msg=key)
    x = torch.randn(4, 1, 28, 28)
    for d in packed.densities:
        packed.set_density(d), reference.set_density(d)
        torch.testing.assert_close(packed(x), reference(x), rtol=1e-4, atol=1e-4)


def test_packed_training_builds_no_dense_weight_or_mask(monkeypatch):
    """Below full density nothing dense is made: no unpacking, no masks, no order."""

    def refuse(*args, **kwargs):
        raise AssertionError("built a dense weight or mask during packed training")

    model = create_model(Architecture(name="cnn", densities=(0.1, 0.25, 0.5, 1.0)))
    packed = PackedModel.from_dress(copy.deepcopy(model).eval(), max_density=0.5)
    monkeypatch.setattr(packed_module, "unpack_rows", refuse)
    monkeypatch.setattr(packed_layer, "unpack_rows", refuse)
    monkeypatch.setattr(RowSparse, "mask", refuse)
    data = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    train(packed, DataLoader(data, batch_size=8), TrainConfig(epochs=1, rerank_every=0, recalibrate_batches=0))
    packed.eval()
    assert not any(key.endswith((".weight", ".order")) for key in packed.net.state_dict()
                   if key.rpartition(".")[0] in packed.sparse_names)
    with pytest.raises(ValueError, match="rerank_every=0"):
        train(packed, DataLoader(data, batch_size=8), TrainConfig(epochs=1, rerank_every=10))
