"""The peers DRESS is judged against: width twins with matched parameter counts, what travels, how it averages."""

import copy
from datetime import timedelta

import pytest
import torch

from agent.client_app import train_peer
from contracts.methods import METHODS, get_method
from contracts.settings import RunSettings, SettingsError, build_run_model
from coordinator.aggregation import Update
from coordinator.peers import WidthStrategy
from dress_model.baselines.ordered_dropout import train_ordered_dropout
from dress_model.baselines.slimmable import level_slices, slim_params
from dress_model.training import TrainConfig

TIERS = (0.1, 0.25, 0.5, 1.0)


def settings(method: str, **changes) -> RunSettings:
    return RunSettings.defaults(method=method, width=4, **changes)


def toy_loader(n: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dress"])
def test_every_peer_level_holds_no_more_than_the_dress_subnet(method) -> None:
    dress = build_run_model(settings("dress"))
    peer = build_run_model(settings(method))
    assert set(peer.densities) <= set(TIERS)
    for level in peer.densities:
        target = dress.subnet_params(level)
        assert 0.8 * target <= slim_params(peer, level) <= target, (level, slim_params(peer, level), target)


def test_level_slices_are_nested_prefixes() -> None:
    model = build_run_model(settings("heterofl"))
    small, large = level_slices(model, 0.1), level_slices(model, 1.0)
    assert set(small) == set(large)
    state = model.state_dict()
    for key in small:
        a, b = state[key][small[key]].shape, state[key][large[key]].shape
        assert all(x <= y for x, y in zip(a, b)), key
    assert any(state[k][small[k]].numel() < state[k][large[k]].numel() for k in small)


def test_which_devices_train_which_level() -> None:
    assert get_method("heterofl").level_for(0.25, TIERS) == 0.25
    assert get_method("fjord").level_for(0.3, TIERS) is None
    assert get_method("fedavg-small").level_for(1.0, (0.1,)) == 0.1
    capable = get_method("fedavg-capable")
    assert capable.level_for(1.0, (1.0,)) == 1.0 and capable.level_for(0.5, (1.0,)) is None


def test_counting_aggregation_averages_each_element_over_the_devices_that_held_it() -> None:
    torch.manual_seed(0)
    model = build_run_model(settings("heterofl"))
    strategy = WidthStrategy(get_method("heterofl"), model, registry=None, calibration=None, fraction=1.0,
                             stale_after=timedelta(seconds=30), max_examples=500,
                             min_devices=1, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updates = []
    for level, delta, examples in ((0.1, 1.0, 300), (1.0, 4.0, 100)):
        slices, record = strategy.payload(level)
        tensors = {k: v + delta for k, v in record.to_torch_state_dict().items()}
        updates.append(Update(slices, tensors, examples))
    strategy.absorb(updates)
    key = "conv2.weight"
    diff = model.state_dict()[key] - before[key]
    small, large = updates[0].sent[key], updates[1].sent[key]
    torch.testing.assert_close(diff[small], torch.full_like(diff[small], (300 * 1.0 + 100 * 4.0) / 400))
    only_large = torch.zeros_like(diff, dtype=torch.bool)
    only_large[large] = True
    only_large[small] = False
    torch.testing.assert_close(diff[only_large], torch.full_like(diff[only_large], 4.0))


def test_a_device_trains_only_its_prefix_and_rejects_foreign_tensors() -> None:
    torch.manual_seed(0)
    model = build_run_model(settings("heterofl"))
    received = {k: model.state_dict()[k][s].clone() for k, s in level_slices(model, 0.25).items()}
    trained, losses = train_peer(copy.deepcopy(model), received, 0.25, get_method("heterofl"), toy_loader(),
                                 TrainConfig(epochs=1, recalibrate_batches=0, rerank_every=0), seed=0)
    assert set(trained) == set(received) and set(losses) == {0.25}
    assert all(trained[k].shape == received[k].shape for k in received)
    assert any(not torch.equal(trained[k], received[k]) for k in received)
    with pytest.raises(ValueError, match="expected the level-0.5 prefixes"):
        train_peer(copy.deepcopy(model), received, 0.5, get_method("heterofl"), toy_loader(), TrainConfig(), seed=0)


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_ordered_dropout_draws_levels_up_to_the_devices_own(distill) -> None:
    torch.manual_seed(0)
    model = build_run_model(settings("fjord"))
    drawn = []
    original = model.set_density
    model.set_density = lambda d: (drawn.append(d), original(d))[1]
    train_ordered_dropout(model, toy_loader(160), TrainConfig(densities=(0.1, 0.25, 0.5), epochs=1, distill=distill),
                          seed=0)
    assert set(drawn) <= {0.1, 0.25, 0.5} and len(set(drawn)) >= 2
    if distill:  # FjORD-KD: the widest level runs every step it teaches
        assert drawn.count(0.5) >= len(drawn) // 2


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="method must be one of dress, heterofl, fjord"):
        settings("fedprox")
