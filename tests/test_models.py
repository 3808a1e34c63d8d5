"""Models: masked forward equals dense forward with pruned weights zeroed; switching; baselines."""

import copy

import pytest
import torch
from torch import nn

from dress_model.baselines.slimmable import slim_params, slimmable_like, widths
from dress_model.layers import DensityCell, DressConv2d, DressLinear
from dress_model.models import create_model

DENS = "1,0.5,0.25,0.1"


def zeroed_dense_copy(model, density):
    """An equivalent plain network: each sparse layer's pruned weights set to 0, no masking at run time."""
    dense = copy.deepcopy(model)
    dense.set_density(density)
    with torch.no_grad():
        for _, layer in dense.sparse_layers():
            layer.weight.mul_(layer.mask(density))
            layer.densities = (1.0,)  # from now on the mask keeps everything
            layer.share_cell(DensityCell(0))
            layer.clear_masks()
    return dense


@pytest.mark.parametrize("name,channels,size", [("cnn", 1, 28), ("resnet8", 3, 32), ("cnn", 3, 32)])
def test_masked_forward_equals_zeroed_dense_forward(name, channels, size) -> None:
    torch.manual_seed(0)
    model = create_model(name, DENS, in_channels=channels, image_size=size).eval()
    x = torch.randn(3, channels, size, size)
    for d in model.densities:
        model.set_density(d)
        dense = zeroed_dense_copy(model, d).eval()
        for _, layer in dense.sparse_layers():
            assert layer.keep() == layer.cols
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_densities_give_different_subnets_and_switching_is_reversible() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", DENS).eval()
    x = torch.randn(2, 1, 28, 28)
    outs = {}
    for d in model.densities:
        model.set_density(d)
        outs[d] = model(x)
    assert not torch.allclose(outs[0.1], outs[1.0])
    for d in (0.1, 1.0, 0.25, 0.1):
        model.set_density(d)
        torch.testing.assert_close(model(x), outs[d])


def test_stem_and_head_stay_dense_and_body_is_sparse() -> None:
    model = create_model("resnet20", DENS, in_channels=3, image_size=32)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    sparse = [type(m) for _, m in model.sparse_layers()]
    assert DressConv2d in sparse and len(sparse) == 18 + 2  # 18 3x3 convs + 2 projection shortcuts
    cnn = create_model("cnn", DENS)
    assert isinstance(cnn.fc1, DressLinear) and type(cnn.fc2) is nn.Linear


def test_subnet_params_shrink_with_density() -> None:
    model = create_model("cnn", DENS)
    params = [model.subnet_params(d) for d in model.densities]
    assert params == sorted(params) and params[-1] == sum(
        p.numel() for n, p in model.named_parameters() if "bn" not in n
    ) + sum(m.weight.shape[1] * 2 for n, m in model.named_modules() if n.startswith("bn"))


def test_unknown_model_and_density_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'.*cnn"):
        create_model("vgg", DENS)
    model = create_model("cnn", DENS)
    with pytest.raises(ValueError, match="0.3 is not one of"):
        model.set_density(0.3)


def test_slimmable_twin_matches_parameter_budget() -> None:
    dress = create_model("cnn", DENS)
    slim = slimmable_like(dress)
    for d in dress.densities:
        ours, theirs = dress.subnet_params(d), slim_params(slim, d)
        assert theirs <= ours and theirs > 0.9 * ours, (d, ours, theirs)
    assert widths(slim)[-1] > 0.999
    x = torch.randn(2, 1, 28, 28)
    for d in slim.densities:
        slim.set_density(d)
        assert slim(x).shape == (2, 10)


def test_grow_from_makes_every_subnet_the_sparsest_one() -> None:
    """A federated run starts with the bands above the sparsest prefix at zero: every subnet is one function."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.1", width=4).eval()
    model.grow_from(0.1)
    x = torch.randn(3, 1, 28, 28)
    outputs = []
    for d in model.densities:
        model.set_density(d)
        outputs.append(model(x))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0])
    for _, layer in model.sparse_layers():
        assert (layer.weight * layer.mask(0.1) != 0).sum() == layer.mask(0.1).sum() > 0
    with pytest.raises(ValueError, match="not one of"):
        model.grow_from(0.3)
