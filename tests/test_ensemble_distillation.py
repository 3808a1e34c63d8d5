"""Server-side ensemble distillation: the ensemble's predictions, a distillation that reaches every density, and
each device's model rebuilt from its reply as the teacher (DRESS and a peer)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from contracts.messages import upload_state
from contracts.methods import get_method
from contracts.settings import RunSettings, build_run_model
from coordinator.aggregation import Update
from coordinator.ensemble_distillation import Teacher, distill, ensemble_predictions
from coordinator.fleet_strategy import RoundStats
from coordinator.peers import WidthStrategy
from coordinator.strategy import DressStrategy
from dress_model.baselines.slimmable import prefix_tensors
from dress_model.models import create_model
from dress_model.training import LogitView, TrainConfig, recalibrate_bn, train


def toy(n: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


@torch.no_grad()
def divergence(model, targets: torch.Tensor, images: torch.Tensor) -> dict[float, float]:
    """KL(targets || subnet) per density, in inference mode."""
    model.eval()
    out = {}
    for d in model.densities:
        model.set_density(d)
        out[d] = F.kl_div(F.log_softmax(model(images), 1), targets, reduction="batchmean").item()
    return out


def test_the_ensemble_weighs_each_device_by_its_examples_and_reads_its_logits_as_its_loss_did() -> None:
    torch.manual_seed(0)
    a, b = create_model("cnn", "1,0.1", width=4).eval(), create_model("cnn", "1,0.1", width=4).eval()
    x = torch.randn(8, 1, 28, 28)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5]] = True
    got = ensemble_predictions([Teacher(a, 1.0, 300.0), Teacher(b, 0.1, 100.0, LogitView(mask))], x)
    with torch.no_grad():
        a.set_density(1.0)
        b.set_density(0.1)
        expected = 0.75 * F.softmax(a(x), 1) + 0.25 * F.softmax(b(x).masked_fill(~mask, 0.0), 1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="at least one teacher"):
        ensemble_predictions([], x)


def test_distillation_brings_every_density_closer_to_the_ensemble() -> None:
    torch.manual_seed(0)
    student, teacher = create_model("cnn", "1,0.5,0.25,0.1", width=4), create_model("cnn", "1,0.1", width=8)
    loader = toy(128)
    images = torch.cat([x for x, _ in loader])
    sharp = ensemble_predictions([Teacher(teacher.eval(), 1.0, 1.0)], images).argmax(1)  # what it says, firmly
    targets = 0.91 * F.one_hot(sharp, 10) + 0.009
    before = divergence(student, targets, images)
    losses = distill(student, targets, images, steps=20, lr=0.05, seed=0)
    recalibrate_bn(student, loader, 8, student.densities)
    after = divergence(student, targets, images)
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert all(after[d] < 0.8 * before[d] for d in student.densities), (before, after)
    with pytest.raises(ValueError, match="one target per image"):
        distill(student, targets[:3], images, steps=1, lr=0.05, seed=0)


def test_a_dress_teacher_is_the_device_subnet_as_it_replied() -> None:
    """Its packed reply folded all the way into the round's starting model: at its density, the same answers."""
    torch.manual_seed(0)
    model = create_model("cnn", "1,0.5,0.25,0.1", width=4).eval()
    strategy = DressStrategy(model, None, toy(), fraction=1.0, min_devices=1, seed=0,  # type: ignore[arg-type]
                             heartbeat_s=5.0, max_examples=100)
    packed, _ = strategy.payload(0.25)
    train(packed, toy(seed=1), TrainConfig(densities=(0.1, 0.25), joint="own", rerank_every=0, recalibrate_batches=0,
                                           lr=0.1))
    device = copy.deepcopy(model)
    strategy.absorb([Update(strategy.payload(0.25)[0], upload_state(packed), 64)], model=device, damped=False)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        packed.eval().set_density(0.25)
        device.eval().set_density(0.25)
        torch.testing.assert_close(device(x), packed(x), atol=1e-4, rtol=1e-4)
        model.set_density(0.25)
        assert not torch.allclose(model(x), packed(x), atol=1e-3)  # the global model itself was left as it was


def test_a_peer_teacher_holds_the_very_slices_its_device_replied() -> None:
    settings = RunSettings.defaults(method="heterofl", width=4)
    strategy = WidthStrategy(get_method("heterofl"), build_run_model(settings), registry=None, calibration=None,
                             fraction=1.0, heartbeat_s=5.0, max_examples=500, min_devices=1, seed=0)
    slices, record = strategy.payload(0.25)
    replied = {k: v + 0.01 for k, v in record.to_torch_state_dict().items()}
    device = copy.deepcopy(strategy.model)
    strategy.absorb([Update(slices, replied, 50, frozenset({1, 2}))], model=device, damped=False)
    held = prefix_tensors(device, slices)
    heads = strategy.head_keys()
    for key, value in replied.items():  # a class row the device did not hold keeps its value, as HeteroFL's does
        if key not in heads:
            torch.testing.assert_close(held[key], value)
    assert torch.equal(prefix_tensors(strategy.model, slices)[next(iter(heads))],
                       record.to_torch_state_dict()[next(iter(heads))])  # the global model untouched
    mask = strategy.teacher_view(Update(slices, replied, 50, frozenset({1, 2}))).mask
    assert mask is not None and mask.nonzero().flatten().tolist() == [1, 2]


@pytest.mark.parametrize("method", ["dress", "heterofl"])
def test_a_round_with_server_distillation_moves_every_density_towards_its_devices(method: str) -> None:
    """The strategy's step: devices' replies folded, then the global model distilled from them; each density is
    closer to the round's ensemble than the aggregate alone was."""
    torch.manual_seed(0)
    settings = RunSettings.defaults(method=method, width=4)
    loader = toy(64)
    common = dict(registry=None, calibration=loader, fraction=1.0, min_devices=1, seed=0, heartbeat_s=5.0,
                  max_examples=100, server_distill=8)
    model = build_run_model(settings)
    strategy = (DressStrategy(model, **common) if method == "dress"  # type: ignore[arg-type]
                else WidthStrategy(get_method(method), model, **common))  # type: ignore[arg-type]
    strategy.stats[1] = RoundStats(1, lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = []
    for i, density in enumerate((1.0, 0.25, 0.1)):
        sent, record = strategy.payload(density)
        if method == "dress":
            train(sent, toy(32, seed=10 + i), TrainConfig(densities=tuple(d for d in sent.densities if d <= density),
                                                     joint="own", rerank_every=0, recalibrate_batches=0, lr=0.1))
            tensors = upload_state(sent)
        else:
            tensors = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in record.to_torch_state_dict().items()}
        trained.append((Update(sent, tensors, 64), density))
    strategy.absorb([u for u, _ in trained])
    aggregated = copy.deepcopy(model)
    recalibrate_bn(aggregated, loader, 8, aggregated.densities)
    strategy.distill_devices(before, trained, 1)
    recalibrate_bn(model, loader, 8, model.densities)

    images = torch.cat([x for x, _ in loader])
    teachers = []
    for update, density in trained:
        device = copy.deepcopy(aggregated)
        device.load_state_dict(before)
        strategy.absorb([update], model=device, damped=False)
        recalibrate_bn(device, loader, 8, [density])
        teachers.append(Teacher(device, density, 64.0, strategy.teacher_view(update)))
    targets = ensemble_predictions(teachers, images)
    alone, distilled = divergence(aggregated, targets, images), divergence(model, targets, images)
    assert all(distilled[d] < alone[d] for d in model.densities), (alone, distilled)
