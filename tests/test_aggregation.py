"""Aggregation: each weight moves towards its average over the devices that trained it, by their share of
the round's examples (devices that did not hold it count as replying it unchanged)."""

import pytest
import torch

from contracts.messages import upload_state
from coordinator.aggregation import Update, aggregate
from dress_model.models import create_model
from dress_model.packed import PackedModel


def device_update(model, density: float, delta: float, examples: int) -> Update:
    """What a device at ``density`` would send back if training added ``delta`` to every weight it holds."""
    sent = PackedModel.from_dress(model, max_density=density)
    trained = sent.to_dress()
    with torch.no_grad():
        for _, layer in trained.sparse_layers():
            layer.weight.add_(delta * layer.mask(density))
        trained.fc2.weight.add_(delta)
    return Update(sent, upload_state(PackedModel.from_dress(trained)), examples)


def test_each_weight_moves_by_the_share_of_examples_that_trained_it() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.1", width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {name: (layer.mask(0.1).clone(), layer.mask(0.5).clone()) for name, layer in model.sparse_layers()}
    aggregate(model, [device_update(model, 0.1, 1.0, examples=300), device_update(model, 0.5, 4.0, examples=100)])
    after = model.state_dict()
    for name, (m01, m05) in masks.items():
        diff = after[f"{name}.weight"] - before[f"{name}.weight"]
        both = m01.bool()
        only_dense = m05.bool() & ~both
        nobody = ~m05.bool()
        torch.testing.assert_close(diff[both], torch.full_like(diff[both], (300 * 1.0 + 100 * 4.0) / 400))
        # only the d=0.5 device (100 of 400 examples) trained these: a quarter of the way to its value
        torch.testing.assert_close(diff[only_dense], torch.full_like(diff[only_dense], 4.0 * 100 / 400))
        assert (diff[nobody] == 0).all(), "weights nobody trained keep their value"
    torch.testing.assert_close(after["fc2.weight"] - before["fc2.weight"], torch.full_like(before["fc2.weight"], 1.75))


def test_per_density_bn_rows_average_only_over_devices_that_have_them() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.1", width=4).eval()
    before = model.bn2.running_mean.clone()
    low = device_update(model, 0.1, 0.0, examples=10)
    high = device_update(model, 0.5, 0.0, examples=30)
    low.tensors["bn2.running_mean"] = torch.full((1, 8), 1.0)
    high.tensors["bn2.running_mean"] = torch.full((2, 8), 5.0)
    aggregate(model, [low, high])
    rm = model.bn2.running_mean
    torch.testing.assert_close(rm[0], torch.full((8,), (10 * 1.0 + 30 * 5.0) / 40))
    torch.testing.assert_close(rm[1], before[1] + (30 / 40) * (5.0 - before[1]))
    torch.testing.assert_close(rm[2], before[2])  # density 1.0: nobody trained it


def test_robust_rules_ignore_a_minority_of_liars_per_weight() -> None:
    """Three devices train the sparsest prefix honestly (+1, +2, +3), one lies (+1000) about a million examples:
    the median and the trimmed mean stay with the honest ones; weights only the liar held move its share."""
    from contracts.settings import Aggregation

    torch.manual_seed(0)
    results = {}
    for spec in ("mean", "median", "trimmed-mean:0.25"):
        model = create_model("cnn", "1,0.5,0.1", width=4).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        honest = [device_update(model, 0.1, delta, examples=100) for delta in (1.0, 2.0, 3.0)]
        liar = device_update(model, 0.5, 1000.0, examples=100)
        aggregate(model, [*honest, liar], Aggregation.parse(spec))
        mask01 = model.conv2.mask(0.1).bool()
        only_liar = model.conv2.mask(0.5).bool() & ~mask01
        diff = model.state_dict()["conv2.weight"] - before["conv2.weight"]
        results[spec] = diff[mask01].mean().item()
        # a weight only the liar held moves by its share of the examples, whatever the rule (1 of 4 devices)
        torch.testing.assert_close(diff[only_liar], torch.full_like(diff[only_liar], 1000.0 / 4))
    assert results["mean"] == pytest.approx((1 + 2 + 3 + 1000) / 4)
    assert results["median"] == pytest.approx(2.5)  # middle two of 1, 2, 3, 1000
    assert results["trimmed-mean:0.25"] == pytest.approx(2.5)  # one cut from each end: mean of 2 and 3


def test_trimmed_mean_cuts_a_liar_among_the_few_devices_of_an_upper_band() -> None:
    """An upper band is trained by two or three capable devices a round: 20% of three rounds up to one cut from
    each end, so a liar among them is cut there too (rounding down would cut nobody)."""
    from contracts.settings import Aggregation

    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.1", width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = [device_update(model, 0.1, 0.0, examples=100) for _ in range(7)]
    capable = [device_update(model, 0.5, delta, examples=100) for delta in (1.0, 2.0, 1000.0)]
    aggregate(model, [*sparse, *capable], Aggregation.parse("trimmed-mean:0.2"))
    upper = model.conv2.mask(0.5).bool() & ~model.conv2.mask(0.1).bool()
    diff = (model.state_dict()["conv2.weight"] - before["conv2.weight"])[upper]
    torch.testing.assert_close(diff, torch.full_like(diff, 2.0 * 300 / 1000))  # the middle one, its 3/10 share


def test_no_updates_change_nothing() -> None:
    model = create_model("cnn", "1,0.5", width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aggregate(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- the server's own step after aggregation (FedAvgM) -------------------------------------------------------


def _server(momentum: float, average: float = 0.0):

    from torch.utils.data import DataLoader, TensorDataset

    from coordinator.strategy import DressStrategy

    model = create_model("cnn", "1,0.5,0.25,0.1", width=4)
    calibration = DataLoader(TensorDataset(torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)), batch_size=8)
    strategy = DressStrategy(model, None, calibration, fraction=1.0, min_devices=1, seed=0,  # type: ignore[arg-type]
                             heartbeat_s=5.0, max_examples=100, server_momentum=momentum,
                             server_average=average)
    return model, strategy


def _round(model, strategy, delta: float) -> dict[str, torch.Tensor]:
    """Aggregation moved every parameter and BN statistic by ``delta``; then the server takes its step."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(delta)
    strategy.server_step(before)
    return before


def test_server_momentum_keeps_moving_along_the_rounds_updates() -> None:
    model, strategy = _server(0.5)
    _round(model, strategy, 1.0)  # first round: velocity = update
    before = _round(model, strategy, 1.0)  # second: velocity = 0.5 * 1 + 1
    after = model.state_dict()
    assert torch.allclose(after["fc2.weight"] - before["fc2.weight"], torch.full_like(before["fc2.weight"], 1.5))
    assert torch.allclose(after["bn1.weight"] - before["bn1.weight"], torch.full_like(before["bn1.weight"], 1.5))
    # statistics are recomputed on server data every round: momentum never touches buffers
    assert torch.allclose(after["bn1.running_mean"] - before["bn1.running_mean"], torch.ones_like(before["bn1.running_mean"]))
    assert torch.equal(after["conv2.order"], before["conv2.order"])


def test_without_server_momentum_the_aggregate_stands() -> None:
    model, strategy = _server(0.0)
    _round(model, strategy, 1.0)
    before = _round(model, strategy, 1.0)
    assert torch.allclose(model.state_dict()["fc2.weight"] - before["fc2.weight"], torch.ones_like(before["fc2.weight"]))
    assert strategy.velocity == {}


def test_the_published_model_is_an_average_of_the_rounds_models() -> None:
    model, strategy = _server(0.0, average=0.75)
    assert strategy.published_state() is None  # nothing averaged before the first round
    strategy.update_average()  # round 1: the average starts as the round's model
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(strategy.published_state()["fc2.weight"], first["fc2.weight"])
    _round(model, strategy, 4.0)
    strategy.update_average()
    published = strategy.published_state()
    assert torch.allclose(published["fc2.weight"], first["fc2.weight"] + 1.0)  # 0.75 * old + 0.25 * (old + 4)
    assert torch.allclose(model.state_dict()["fc2.weight"], first["fc2.weight"] + 4.0)  # training goes on from its own
    # its rows are ranked by its own weights, its BN statistics measured with them
    from dress_model.sparsity import magnitude, row_order

    for _, layer in strategy.average.sparse_layers():
        assert torch.equal(layer.order, row_order(layer.weight2d(), magnitude).to(torch.int32))
    assert not torch.equal(published["bn1.running_mean"], model.state_dict()["bn1.running_mean"])
    _, off = _server(0.0, average=0.0)
    off.update_average()
    assert off.published_state() is None


def test_undamped_aggregation_moves_each_weight_all_the_way_to_its_trainers_average() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.1", width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aggregate(model, [device_update(model, 0.1, 1.0, examples=300), device_update(model, 0.5, 4.0, examples=100)],
              damped=False)
    diff = model.state_dict()["conv2.weight"] - before["conv2.weight"]
    m01, m05 = model.conv2.mask(0.1).bool(), model.conv2.mask(0.5).bool()
    torch.testing.assert_close(diff[m01], torch.full_like(diff[m01], (300 * 1.0 + 100 * 4.0) / 400))
    only_dense = m05 & ~m01
    torch.testing.assert_close(diff[only_dense], torch.full_like(diff[only_dense], 4.0))  # not 4 * 100/400
    assert torch.all(diff[~m05] == 0)
