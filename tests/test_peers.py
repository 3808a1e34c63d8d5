"""The peers DRESS is judged against: width twins with matched parameter counts, what travels, how it averages."""

import copy

import pytest
import torch

from agent.local_training import device_seed, train_density
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


def test_which_devices_train_which_density() -> None:
    assert get_method("heterofl").density_for(0.25, TIERS) == 0.25
    assert get_method("fjord").density_for(0.3, TIERS) is None
    assert get_method("fedavg-small").density_for(1.0, (0.1,)) == 0.1
    capable = get_method("fedavg-capable")
    assert capable.density_for(1.0, (1.0,)) == 1.0 and capable.density_for(0.5, (1.0,)) is None


def _strategy(method: str, **options) -> WidthStrategy:
    return WidthStrategy(get_method(method), build_run_model(settings(method)), registry=None, calibration=None,
                         fraction=1.0, heartbeat_s=5.0, max_examples=500, min_devices=1, seed=0,
                         **options)


def _updates(strategy: WidthStrategy, replies) -> list[Update]:
    """(level, delta added to every sent tensor, examples, classes) -> the updates of those replies."""
    updates = []
    for level, delta, examples, classes in replies:
        slices, record = strategy.payload(level)
        tensors = {k: v + delta for k, v in record.to_torch_state_dict().items()}
        updates.append(Update(slices, tensors, examples, classes))
    return updates


def _absorbed(strategy: WidthStrategy, replies) -> tuple[list[Update], dict, dict]:
    """The replies' updates, and the model's state before and after the strategy folded them in."""
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    updates = _updates(strategy, replies)
    strategy.absorb(updates)
    return updates, before, strategy.model.state_dict()


def _held_only_by_the_larger(updates: list[Update], key: str, shape) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[updates[1].sent[key]] = True
    mask[updates[0].sent[key]] = False
    return mask


def test_counting_aggregation_averages_each_element_over_the_devices_that_held_it() -> None:
    """FjORD's average: by examples, all the way to the holders' average (undamped)."""
    torch.manual_seed(0)
    updates, before, after = _absorbed(_strategy("fjord", damped=False),
                                       [(0.1, 1.0, 300, None), (1.0, 4.0, 100, None)])
    key = "conv2.weight"
    diff = after[key] - before[key]
    small = updates[0].sent[key]
    torch.testing.assert_close(diff[small], torch.full_like(diff[small], (300 * 1.0 + 100 * 4.0) / 400))
    only_large = _held_only_by_the_larger(updates, key, diff.shape)
    torch.testing.assert_close(diff[only_large], torch.full_like(diff[only_large], 4.0))


def test_heterofl_counts_devices_and_averages_each_class_row_over_the_devices_holding_that_class() -> None:
    """As Flower's baselines/heterofl: one vote per device whatever its examples; a classifier row moves only
    with the devices whose labels include its class, and a row no device holds keeps its value."""
    torch.manual_seed(0)
    strategy = _strategy("heterofl", damped=False)
    updates, before, after = _absorbed(strategy, [(0.1, 1.0, 300, frozenset({0, 1})),
                                                  (1.0, 4.0, 100, frozenset({1, 2}))])
    diff = after["conv2.weight"] - before["conv2.weight"]
    small = updates[0].sent["conv2.weight"]
    torch.testing.assert_close(diff[small], torch.full_like(diff[small], 2.5))  # (1 + 4) / 2, not by examples
    (head,) = {k.rsplit(".", 1)[0] for k in strategy.head_keys()}
    weight = after[f"{head}.weight"] - before[f"{head}.weight"]
    small_cols = updates[0].sent[f"{head}.weight"][1]
    assert torch.allclose(weight[0, small_cols], torch.tensor(1.0, dtype=weight.dtype))  # class 0: device 1 only
    assert torch.allclose(weight[1, small_cols], torch.tensor(2.5, dtype=weight.dtype))  # class 1: both
    assert torch.allclose(weight[2], torch.tensor(4.0, dtype=weight.dtype))  # class 2: device 2 only
    assert torch.equal(weight[3:], torch.zeros_like(weight[3:]))  # nobody holds classes 3-9
    bias = after[f"{head}.bias"] - before[f"{head}.bias"]
    torch.testing.assert_close(bias[:3].float(), torch.tensor([1.0, 2.5, 4.0]))


def test_damped_peer_aggregation_moves_an_element_by_its_holders_share_of_the_round() -> None:
    torch.manual_seed(0)
    updates, before, after = _absorbed(_strategy("fjord", damped=True),
                                       [(0.1, 1.0, 300, None), (1.0, 4.0, 100, None)])
    diff = after["conv2.weight"] - before["conv2.weight"]
    only_large = _held_only_by_the_larger(updates, "conv2.weight", diff.shape)
    torch.testing.assert_close(diff[only_large], torch.full_like(diff[only_large], 100 / 400 * 4.0))


def test_a_heterofl_device_trains_only_its_prefix_on_its_own_labels() -> None:
    """Its level's prefixes move, the rest of the model does not; logits of classes it lacks are masked (their
    classifier rows get no gradient); without its labels named it refuses to train."""
    torch.manual_seed(0)
    model = build_run_model(settings("heterofl"))
    slices = level_slices(model, 0.25)
    before = copy.deepcopy(model.state_dict())
    method = get_method("heterofl")
    config = TrainConfig(epochs=1, recalibrate_batches=0, rerank_every=0, classes=(0, 1, 2))
    losses, macs = train_density(method, model, 0.25, toy_loader(), config, seed=0)
    assert set(losses) == {0.25} and macs > 0
    after = model.state_dict()
    assert any(not torch.equal(after[k][s], before[k][s]) for k, s in slices.items())
    (head,) = {k.rsplit(".", 1)[0] for k in slices if k.endswith(".bias") and after[k].shape[0] == 10}
    for field in ("weight", "bias"):  # momentum-free first step aside, weight decay alone moves masked rows
        moved = (after[f"{head}.{field}"] - before[f"{head}.{field}"]).abs().flatten(1).sum(1) if field == "weight" \
            else (after[f"{head}.{field}"] - before[f"{head}.{field}"]).abs()
        assert moved[:3].min() > 10 * moved[3:].max(), field
    with pytest.raises(ValueError, match="config.classes"):
        train_density(method, model, 0.25, toy_loader(), TrainConfig(), seed=0)


@pytest.mark.parametrize("kd", [False, True])
def test_ordered_dropout_draws_levels_up_to_the_devices_own(kd) -> None:
    torch.manual_seed(0)
    model = build_run_model(settings("fjord"))
    drawn = []
    original = model.set_density
    model.set_density = lambda d: (drawn.append(d), original(d))[1]
    train_ordered_dropout(model, toy_loader(160), TrainConfig(densities=(0.1, 0.25, 0.5), epochs=1), seed=0, kd=kd)
    assert set(drawn) <= {0.1, 0.25, 0.5} and len(set(drawn)) >= 2
    if kd:  # FjORD-KD as published: the widest level trains on every step, before the drawn one
        assert drawn[0::2] == [0.5] * (len(drawn) // 2)


def test_fjord_devices_draw_their_own_widths() -> None:
    """Two devices in the same round draw different width sequences (the seed is the device's), and a device's
    draws are the same whatever method the fleet runs (paired comparisons)."""
    def draws(device: str) -> list[float]:
        model = build_run_model(settings("fjord"))
        seen = []
        original = model.set_density
        model.set_density = lambda d: (seen.append(d), original(d))[1]
        train_ordered_dropout(model, toy_loader(160), TrainConfig(densities=TIERS, epochs=1),
                              seed=device_seed(0, 3, device))
        return seen

    assert draws("sim-0001") != draws("sim-0002")
    assert draws("sim-0001") == draws("sim-0001")


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="method must be one of dress, heterofl, fjord"):
        settings("fedprox")


@pytest.mark.parametrize("classes, accepted", [([0, 3, 9], True), (None, False), ([], False), ([1, 1], False),
                                               ([10], False), ([-1], False), ([0.5], False)])
def test_a_heterofl_reply_must_name_its_labels_as_distinct_classes_of_the_model(classes, accepted) -> None:
    from flwr.app import MetricRecord

    from coordinator.fleet_strategy import Sent
    from coordinator.validation import RejectedUpdate

    strategy = _strategy("heterofl")
    slices, record = strategy.payload(0.25)
    metrics = MetricRecord({"num-examples": 10, **({"classes": classes} if classes is not None else {})})
    sent = Sent(1, 0.25, slices, None)
    if accepted:
        assert strategy.update_of(sent, record.to_torch_state_dict(), metrics).classes == frozenset(classes)
    else:
        with pytest.raises(RejectedUpdate, match="metrics.classes"):
            strategy.update_of(sent, record.to_torch_state_dict(), metrics)
