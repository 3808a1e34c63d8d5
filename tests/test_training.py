"""Joint training on a real Fashion-MNIST slice, BN recalibration, and training-config validation."""

import copy
import random
from collections import Counter

import pytest
import torch

from dress_model.data import load_dataset
from dress_model.layers import DensityBatchNorm
from dress_model.models import create_model
from dress_model.packed import PackedModel
from dress_model.training import (
    OWN_SHARE,
    LogitView,
    TrainConfig,
    evaluate,
    joint_step,
    logit_view,
    own_drawn_level,
    recalibrate_bn,
    sandwich_levels,
    sandwich_step,
    train,
)


@pytest.fixture(scope="module")
def fmnist_slice():
    try:
        data = load_dataset("fashion-mnist", "train")
    except Exception as e:  # the Debian package is installed by `make setup`
        pytest.skip(f"Fashion-MNIST not available: {e}")
    return data.subset(range(1024))


def test_joint_steps_reduce_every_density_loss(fmnist_slice) -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.25,0.1", width=8)
    x, y = fmnist_slice.images[:256], fmnist_slice.labels[:256]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = joint_step(model, x, y, model.densities, [0.25] * 4, opt)
    for _ in range(15):
        last = joint_step(model, x, y, model.densities, [0.25] * 4, opt)
    for d in model.densities:
        assert last[d] < 0.7 * first[d], f"density {d}: loss {first[d]:.3f} -> {last[d]:.3f}"


def test_zero_weighted_density_gets_no_gradient() -> None:
    """The loss weights really weigh: a density with weight 0 contributes nothing to the step."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.1", width=4)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    joint_step(model, x, y, (0.1, 1.0), (0.0, 1.0), opt)
    grad_only_dense = model.bn2.weight.grad.clone()
    assert grad_only_dense[0].abs().sum() == 0  # BN affine of density 0.1 untouched
    assert grad_only_dense[1].abs().sum() > 0


def test_train_learns_and_evaluate_reports_every_density(fmnist_slice) -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.25", width=8)
    loader = fmnist_slice.loader(64, seed=0)
    before = evaluate(model, loader)
    train(model, loader, TrainConfig(epochs=2, lr=0.05, rerank_every=5))
    after = evaluate(model, loader)
    assert set(after) == {0.25, 1.0}
    for d in after:
        assert after[d] > before[d] + 30 and after[d] > 60, (before, after)


def test_recalibration_fills_per_density_statistics(fmnist_slice) -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.1", width=4, bn_affine="shared")
    recalibrate_bn(model, fmnist_slice.loader(128), batches=2, densities=model.densities)
    bn = model.bn3  # after the sparse fc1: statistics must differ between densities
    assert isinstance(bn, DensityBatchNorm) and bn.weight.shape[0] == 1
    assert not torch.allclose(bn.running_var[0], bn.running_var[1])
    assert (bn.num_batches == 2).all() and bn.momentum == 0.1


def test_large_batch_passes_run_channels_last_and_match_nchw(fmnist_slice) -> None:
    """evaluate and recalibrate_bn run a channels-last copy; the statistics land in the caller's own (NCHW)
    tensors and equal an NCHW pass up to float rounding."""
    torch.manual_seed(0)
    model = create_model("resnet8", "1,0.25", width=4)
    loader = fmnist_slice.loader(128, shuffle=False)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():  # the same cumulative average, in NCHW
        for d in reference.densities:
            reference.set_density(d)
            i = reference.level_of(d)
            for m in (m for m in reference.modules() if isinstance(m, DensityBatchNorm)):
                m.running_mean[i].zero_()
                m.running_var[i].fill_(1.0)
                m.num_batches[i] = 0
                m.momentum = None
            for b, (x, _) in enumerate(loader):
                if b < 3:
                    reference(x)
    recalibrate_bn(model, loader, batches=3, densities=model.densities)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert ours.is_contiguous(), name
        if ours.is_floating_point():
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), name
    reference.eval()
    expected = {}
    with torch.no_grad():
        for d in reference.densities:
            reference.set_density(d)
            expected[d] = 100.0 * sum((reference(x).argmax(1) == y).sum().item() for x, y in loader) / 1024
    assert evaluate(model, loader) == pytest.approx(expected, abs=0.2)  # a tie may flip an image


@pytest.mark.parametrize(
    "weights,match", [((1.0,), "one loss weight per density"), ((1.0, -1.0), ">= 0"), ((0.0, 0.0), "positive sum")]
)
def test_bad_loss_weights_are_rejected(weights, match) -> None:
    model = create_model("cnn", "1,0.5", width=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match=match):
        train(model, loader, TrainConfig(loss_weights=weights))


def test_training_a_density_the_model_lacks_is_rejected() -> None:
    model = create_model("cnn", "1,0.5", width=4)
    with pytest.raises(ValueError, match="0.25 is not one of"):
        train(model, [], TrainConfig(densities=(0.25,)))


@pytest.mark.parametrize("joint", ["all", "own"])
def test_anchor_loss_keeps_denser_subnets_near_the_sparsest_received(fmnist_slice, joint: str) -> None:
    """With distill, the dense subnet's predictions stay closer to the anchor (the sparsest subnet as received)
    than without it, on the same data and steps: whether every density trains (all) or the densest alone (own)."""
    x = fmnist_slice.images[:256]
    divergence = {}
    for distill in (0.0, 0.9):
        torch.manual_seed(0)
        model = create_model("cnn", "1,0.1", width=8)
        train(model, fmnist_slice.subset(range(64)).loader(32, shuffle=True, seed=0),
              TrainConfig(epochs=2, recalibrate_batches=0, rerank_every=0))  # a common starting point
        anchor = copy.deepcopy(model).eval()
        anchor.set_density(0.1)
        train(model, fmnist_slice.subset(range(512, 1024)).loader(32, shuffle=True, seed=0),
              TrainConfig(epochs=2, lr=0.1, recalibrate_batches=0, rerank_every=0, distill=distill, joint=joint))
        model.eval().set_density(1.0)
        with torch.no_grad():
            p, q = torch.log_softmax(anchor(x), 1), torch.log_softmax(model(x), 1)
            divergence[distill] = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()
    assert divergence[0.9] < 0.7 * divergence[0.0], divergence


class _OneLayer(torch.nn.Module):
    """A linear classifier whose every density is the same function: a subnet that already equals its anchor."""

    densities = (0.1, 1.0)
    active_density = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def set_density(self, density: float) -> None:
        self.active_density = density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_subnet_that_matches_its_anchor_is_pulled_nowhere_under_logit_adjustment() -> None:
    """The anchor's predictions pass through the same view as the subnet's (the device's label prior added to
    both): a subnet that equals its anchor gets no gradient from the anchor loss, only (1 - distill) of the
    labels' one. (Compared raw against adjusted, the anchor pulled every device's model away from its own
    classes.)"""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    view = LogitView(offset=torch.log(torch.tensor([0.8, 0.15, 0.05])))
    moved = {}
    for distill in (0.0, 0.5):
        torch.manual_seed(1)
        model = _OneLayer()
        start = model.fc.weight.detach().clone()
        anchor = copy.deepcopy(model)
        anchor.set_density(0.1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        joint_step(model, x, y, [1.0], [1.0], optimizer, anchor, distill, view)
        moved[distill] = model.fc.weight.detach() - start
    torch.testing.assert_close(moved[0.5], 0.5 * moved[0.0])


def test_distill_weight_out_of_range_is_rejected() -> None:
    model = create_model("cnn", "1,0.1", width=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 28, 28), torch.zeros(4).long()))
    with pytest.raises(ValueError, match="distill must be in"):
        train(model, loader, TrainConfig(distill=1.0))


def test_a_sandwich_step_trains_the_densest_the_sparsest_and_one_drawn_between() -> None:
    rng = random.Random(0)
    assert sandwich_levels((0.5,), rng) == [0.5]
    assert sandwich_levels((0.1, 0.5), rng) == [0.5, 0.1]
    drawn = {tuple(sandwich_levels((0.1, 0.25, 0.5, 1.0), rng)) for _ in range(50)}
    assert drawn == {(1.0, 0.5, 0.1), (1.0, 0.25, 0.1)}


def test_the_sandwich_gives_the_densest_band_its_whole_gradient_where_the_mean_gives_a_share() -> None:
    """Weights only the densest subnet holds move by the densest loss's whole gradient under the sandwich rule
    (the smaller subnets learn from its predictions and never reach them), by 1/k of it under the mean."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.25,0.1", width=4)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    only_densest = 1 - model.fc1.mask(0.5)
    assert only_densest.sum() > 0

    def moved(step) -> torch.Tensor:
        trained = copy.deepcopy(model)
        before = trained.fc1.weight.detach().clone()
        step(trained, torch.optim.SGD(trained.parameters(), lr=1.0))
        return (trained.fc1.weight.detach() - before) * only_densest

    reference = copy.deepcopy(model)
    reference.train().set_density(1.0)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    densest_alone = -reference.fc1.weight.grad * only_densest
    sandwich = moved(lambda m, opt: sandwich_step(m, x, y, m.densities, opt, random.Random(0)))
    mean = moved(lambda m, opt: joint_step(m, x, y, m.densities, [0.25] * 4, opt))
    summed = moved(lambda m, opt: joint_step(m, x, y, m.densities, [1.0] * 4, opt))
    torch.testing.assert_close(sandwich, densest_alone)
    torch.testing.assert_close(summed, densest_alone)
    torch.testing.assert_close(mean, densest_alone / 4)


def test_the_band_rule_moves_each_weight_by_the_mean_of_the_subnets_that_hold_it() -> None:
    """Under ``joint="band"`` a weight only the densest subnet holds moves by the densest loss's gradient (as
    summed), a weight of the sparsest prefix by the mean over every subnet's (as the mean rule): the dense model
    and its packed subnets, what a device trains, move alike."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.25,0.1", width=4)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    only_densest, prefix = 1 - model.fc1.mask(0.5), model.fc1.mask(0.1)

    def stepped(trainee, step):
        trainee = copy.deepcopy(trainee)
        step(trainee, torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=1.0))
        return trainee

    def fc1_moved(trained) -> torch.Tensor:
        return trained.fc1.weight.detach() - model.fc1.weight.detach()

    band = stepped(model, lambda m, opt: joint_step(m, x, y, m.densities, [1.0] * 4, opt, band_mean=True))
    summed = stepped(model, lambda m, opt: joint_step(m, x, y, m.densities, [1.0] * 4, opt))
    mean = stepped(model, lambda m, opt: joint_step(m, x, y, m.densities, [0.25] * 4, opt))
    torch.testing.assert_close(fc1_moved(band) * only_densest, fc1_moved(summed) * only_densest)
    torch.testing.assert_close(fc1_moved(band) * prefix, fc1_moved(mean) * prefix)
    assert (fc1_moved(band) * only_densest).abs().sum() > 0
    torch.testing.assert_close(band.fc1.bias, mean.fc1.bias)  # shared by every subnet: the mean

    packed = PackedModel.from_dress(model)
    packed.train()
    packed_band = stepped(packed, lambda m, opt: joint_step(m, x, y, m.densities, [1.0] * 4, opt, band_mean=True))
    torch.testing.assert_close(packed_band.to_dress().fc1.weight, band.fc1.weight, atol=1e-5, rtol=1e-4)


def test_the_own_and_ends_rules_train_the_densest_alone_or_with_the_sparsest() -> None:
    """``joint="own"``: one forward and backward per step, of the densest density given; the bands only sparser
    subnets hold move with it (they are inside it), their BN rows do not."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.25,0.1", width=4)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    before = copy.deepcopy(model)
    losses = train(model, loader, TrainConfig(densities=(0.1, 0.25, 0.5), joint="own", rerank_every=0,
                                              recalibrate_batches=0, weight_decay=0.0))
    assert set(losses) == {0.5}
    prefix = before.fc1.mask(0.1).bool()
    assert not torch.equal(model.fc1.weight[prefix], before.fc1.weight[prefix])  # the 0.1 prefix is in 0.5
    only_densest = (1 - before.fc1.mask(0.5)).bool()
    assert torch.equal(model.fc1.weight[only_densest], before.fc1.weight[only_densest])  # beyond 0.5: untouched
    norm = next(m for m in model.modules() if isinstance(m, DensityBatchNorm))
    old = next(m for m in before.modules() if isinstance(m, DensityBatchNorm))
    assert torch.equal(norm.weight[0], old.weight[0]) and not torch.equal(norm.weight[2], old.weight[2])
    ends = train(copy.deepcopy(before), loader, TrainConfig(densities=(0.1, 0.25, 0.5), joint="ends", rerank_every=0,
                                                            recalibrate_batches=0))
    assert set(ends) == {0.1, 0.5}  # the densest and the sparsest
    drawn = train(copy.deepcopy(before), loader, TrainConfig(densities=(0.1, 0.25, 0.5), joint="sandwich-labels",
                                                             rerank_every=0, recalibrate_batches=0), seed=1)
    assert set(drawn) == {0.1, 0.25, 0.5}  # three subnets: the middle one drawn, each on the labels
    with pytest.raises(ValueError, match="takes no distill"):
        train(model, loader, TrainConfig(joint="sandwich-labels", distill=0.5))
    one = train(copy.deepcopy(before), loader, TrainConfig(densities=(0.1, 0.25, 0.5), joint="own-drawn",
                                                           rerank_every=0, recalibrate_batches=0), seed=1)
    assert len(one) == 1 and set(one) <= {0.1, 0.25, 0.5}  # one subnet a step


def test_own_drawn_trains_its_own_density_on_half_the_steps_and_every_sparser_one_on_the_rest() -> None:
    rng = random.Random(0)
    draws = Counter(own_drawn_level((0.25, 0.1, 0.5), rng) for _ in range(4000))
    assert set(draws) == {0.1, 0.25, 0.5}  # a density nobody holds as its own is trained too
    assert abs(draws[0.5] / 4000 - OWN_SHARE) < 0.03
    assert abs(draws[0.1] - draws[0.25]) / 4000 < 0.04  # the sparser ones alike
    assert own_drawn_level((0.1,), rng) == 0.1


def test_sandwich_training_learns_every_density(fmnist_slice) -> None:
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.25,0.1", width=8)
    loader = fmnist_slice.loader(64, seed=0)
    train(model, loader, TrainConfig(epochs=2, lr=0.05, rerank_every=5, joint="sandwich"), seed=3)
    after = evaluate(model, loader)
    assert min(after.values()) > 60, after


@pytest.mark.parametrize("config, match", [
    (TrainConfig(joint="every"),
     "joint must be one of all, sum, band, sandwich, own, ends, sandwich-labels, own-drawn"),
    (TrainConfig(joint="sum", loss_weights=(1.0, 1.0)), "takes no loss_weights"),
    (TrainConfig(joint="sandwich", distill=0.5), "takes no distill"),
    (TrainConfig(joint="sandwich", loss_weights=(1.0, 1.0)), "takes no distill"),
])
def test_bad_joint_rules_are_rejected(config, match) -> None:
    model = create_model("cnn", "1,0.1", width=4)
    with pytest.raises(ValueError, match=match):
        train(model, [], config)


def _steps_taken(model, loader, config: TrainConfig) -> list[float]:
    """The learning rate of every optimizer step ``train`` takes (read as each step runs)."""
    seen: list[float] = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = step
    try:
        train(model, loader, config)
    finally:
        torch.optim.SGD.step = original
    return seen


@pytest.mark.parametrize("examples, expected", [(32, [0.1]), (64, [0.1, 0.05])])
def test_a_device_with_one_or_two_local_steps_trains_at_the_rounds_rate(fmnist_slice, examples, expected) -> None:
    """One local step is plain SGD at the peak rate (federated SGD); two take the peak and half of it. torch's
    OneCycleLR took a one-step device's only step at peak/25/1e4, so its model never moved."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.25", width=4)
    loader = fmnist_slice.subset(range(examples)).loader(32, seed=0)
    config = TrainConfig(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, rerank_every=0, recalibrate_batches=0)
    assert _steps_taken(model, loader, config) == pytest.approx(expected)
    if examples == 32:  # the one step moved every weight by lr x its gradient
        torch.manual_seed(0)
        start = create_model("cnn", "1,0.25", width=4)
        x, y = next(iter(loader))
        opt = torch.optim.SGD(start.parameters(), lr=0.1)
        before = copy.deepcopy(start.state_dict())
        joint_step(start, x, y, start.densities, [0.5, 0.5], opt)
        moved = (start.conv1.weight - before["conv1.weight"]).abs().max().item()
        assert moved > 1e-4  # a real step, not 1e-7 of one
        torch.testing.assert_close(model.conv1.weight, start.conv1.weight)


def test_many_local_steps_warm_up_then_anneal_without_wasting_one(fmnist_slice) -> None:
    model = create_model("cnn", "1,0.25", width=4)
    loader = fmnist_slice.subset(range(640)).loader(32, seed=0)  # 20 steps
    rates = _steps_taken(model, loader, TrainConfig(epochs=1, lr=0.1, rerank_every=0, recalibrate_batches=0))
    assert len(rates) == 20
    peak = rates.index(max(rates))
    assert rates[0] == pytest.approx(0.1 / 25) and max(rates) == pytest.approx(0.1)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))  # warm-up climbs
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))  # then anneals
    assert rates[-1] > 0.1 / 200  # the last step still trains (OneCycleLR: 0.1 / 25 / 1e4)


def test_logit_adjustment_adds_the_log_of_the_smoothed_label_frequencies() -> None:
    config = TrainConfig(label_counts=(6, 2, 0), logit_adjust=2.0)
    view = logit_view(config, 3)
    expected = 2.0 * torch.log(torch.tensor([7.0, 3.0, 1.0]) / 11.0)
    assert torch.allclose(view.offset, expected)
    assert view.mask is None and not view.plain
    assert logit_view(TrainConfig(), 3).plain
    masked = logit_view(TrainConfig(classes=(0, 2)), 3)
    assert masked.mask.tolist() == [True, False, True] and masked.offset is None


@pytest.mark.parametrize("config, match", [
    (TrainConfig(logit_adjust=-1.0, label_counts=(1, 1)), "logit_adjust must be >= 0"),
    (TrainConfig(logit_adjust=1.0), "needs label_counts, one per class"),
    (TrainConfig(logit_adjust=1.0, label_counts=(1, 2, 3)), "needs label_counts, one per class"),
])
def test_bad_logit_adjustment_is_rejected(config, match) -> None:
    with pytest.raises(ValueError, match=match):
        logit_view(config, 2)


def test_a_skewed_shard_biases_the_model_less_under_logit_adjustment(fmnist_slice) -> None:
    """A device whose shard is 90 % one class: trained on plain logits, the model predicts that class for much of
    a balanced test; trained on adjusted logits, it learns the classes, not the shard's skew."""
    labels = fmnist_slice.labels
    major = torch.nonzero(labels == 0).flatten()[:90].tolist()
    minor = torch.nonzero(labels != 0).flatten()[:10].tolist()
    shard = fmnist_slice.subset(major + minor)
    held_out = fmnist_slice.subset(range(512, 1024))
    counts = tuple(torch.bincount(shard.labels, minlength=10).tolist())
    shares = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        model = create_model("cnn", "1,0.5", width=4)
        train(model, shard.loader(20, shuffle=True, seed=0), TrainConfig(
            epochs=6, lr=0.05, joint="own", rerank_every=0, recalibrate_batches=0, label_counts=counts,
            logit_adjust=tau))
        model.eval()
        with torch.no_grad():
            shares[tau] = float((model(held_out.images).argmax(1) == 0).float().mean())
    assert shares[1.0] < 0.5 * shares[0.0], shares


def test_the_sandwich_rule_refuses_logit_adjustment() -> None:
    model = create_model("cnn", "1,0.5,0.1", width=4)
    loader = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    with pytest.raises(ValueError, match="logit_adjust"):
        train(model, loader, TrainConfig(joint="sandwich", label_counts=(1,) * 10, logit_adjust=1.0))
