"""MACs counted as a model runs, against the layer shapes worked out by hand; what a device's step costs per
method; the compute-matched budget."""

from __future__ import annotations

import pytest
import torch

from agent.local_training import TRAINED, compute_budget, local_epochs, step_macs, train_density
from contracts.methods import get_method
from contracts.settings import RunSettings, build_run_model
from dress_model.cost import counting_macs, forward_macs
from dress_model.models import create_model
from dress_model.packed import PackedModel
from dress_model.training import TrainConfig


def test_a_dense_forward_counts_every_weight_at_every_output_position() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10))
    with counting_macs(net) as meter:
        with torch.no_grad():
            net(torch.zeros(2, 1, 8, 8))
    assert meter.total == 2 * (4 * 9 * 64 + 256 * 10)
    with counting_macs(net) as meter:  # with a graph: forward + backward, three times the forward
        net(torch.zeros(2, 1, 8, 8))
    assert meter.total == 3 * 2 * (4 * 9 * 64 + 256 * 10)


def test_a_subnet_costs_its_density_and_packed_costs_what_masked_does() -> None:
    model = create_model(RunSettings.defaults().architecture()).eval()
    costs = {d: forward_macs(model, d) for d in model.densities}
    assert sorted(costs.values()) == [costs[d] for d in sorted(costs)]  # sparser is cheaper
    packed = PackedModel.from_dress(model)
    assert {d: forward_macs(packed, d) for d in packed.densities} == costs
    twin = build_run_model(RunSettings.defaults(method="heterofl"))
    assert forward_macs(twin, 1.0) == costs[1.0]  # the full width is the same dense network


def test_a_step_costs_what_its_method_trains() -> None:
    dress = PackedModel.from_dress(create_model(RunSettings.defaults().architecture()).eval())
    twin = build_run_model(RunSettings.defaults(method="heterofl"))
    f = {d: forward_macs(dress, d) for d in dress.densities}
    w = {d: forward_macs(twin, d) for d in twin.densities}
    assert step_macs(get_method("dress"), dress, 0.5, distill=0.0) == TRAINED * (f[0.1] + f[0.25] + f[0.5])
    assert step_macs(get_method("dress"), dress, 0.5, distill=0.5) == TRAINED * (f[0.1] + f[0.25] + f[0.5]) + f[0.1]
    assert step_macs(get_method("dress"), dress, 0.5, 0.0, joint="sandwich") == pytest.approx(
        TRAINED * (f[0.5] + f[0.25] + f[0.1]))
    assert step_macs(get_method("dress"), dress, 1.0, 0.0, joint="sandwich") == pytest.approx(
        TRAINED * (f[1.0] + (f[0.5] + f[0.25]) / 2 + f[0.1]))
    assert step_macs(get_method("dress"), dress, 0.1, 0.0, joint="sandwich") == TRAINED * f[0.1]
    assert step_macs(get_method("dress"), dress, 1.0, 0.0, joint="sandwich-labels") == step_macs(
        get_method("dress"), dress, 1.0, 0.0, joint="sandwich")  # the same subnets, another target
    assert step_macs(get_method("dress"), dress, 0.5, 0.0, joint="own-drawn") == pytest.approx(
        TRAINED * (f[0.5] + (f[0.1] + f[0.25]) / 2) / 2)  # its own on half the steps, a sparser one on the rest
    assert step_macs(get_method("dress"), dress, 0.1, 0.0, joint="own-drawn") == TRAINED * f[0.1]
    assert step_macs(get_method("dress"), dress, 0.5, 0.5, joint="own") == TRAINED * f[0.5] + f[0.1]  # anchored
    assert step_macs(get_method("dress"), dress, 0.1, 0.5, joint="own") == TRAINED * f[0.1]  # is its own anchor
    assert step_macs(get_method("heterofl"), twin, 0.5, 0.0) == TRAINED * w[0.5]
    assert step_macs(get_method("fjord"), twin, 0.25, 0.0) == pytest.approx(TRAINED * (w[0.1] + w[0.25]) / 2)
    assert step_macs(get_method("fjord-kd"), twin, 0.25, 0.0) == pytest.approx(
        TRAINED * w[0.25] + TRAINED * (w[0.1] + w[0.25]) / 2)


@pytest.mark.parametrize("method, joint", [("dress", "all"), ("dress", "own"), ("heterofl", "all"),
                                           ("fjord-kd", "all")])
def test_compute_matched_devices_spend_their_budget_whatever_the_method(method: str, joint: str) -> None:
    """Counted as it trains: a compute-matched device at tier 0.5 spends about its budget (steps are whole, and
    FjORD's draws random), while with equal epochs a DRESS device spends more than a HeteroFL one."""
    settings = RunSettings.defaults(method=method, width=8)
    full = create_model(settings.architecture()).eval()
    model = PackedModel.from_dress(full, max_density=0.5) if method == "dress" else build_run_model(settings)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 16 steps a pass
    budget = compute_budget(0.5, forward_macs(full, 1.0))
    epochs = local_epochs(get_method(method), model, 0.5, 2.0, 0.5, budget, joint)
    config = TrainConfig(epochs=epochs, distill=0.5, rerank_every=0, recalibrate_batches=0, joint=joint,
                         classes=tuple(range(10)) if method == "heterofl" else None)
    _, spent = train_density(get_method(method), model, 0.5, loader, config, seed=0)
    assert spent == pytest.approx(2.0 * 256 * budget, rel=0.25)
    if method == "dress" and joint == "all":
        assert epochs < 1.0  # its joint step trains three densities: fewer steps
