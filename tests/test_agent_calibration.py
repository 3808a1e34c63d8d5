"""Calibration on this machine: one point per density, sparser never costlier beyond noise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import architecture

from agent.calibration import activation_bytes, calibrate, image_shape, initial_model, training_costs
from contracts.wire import architecture_from_proto, architecture_to_proto
from protos.dress.fleet.v1 import control_plane_pb2 as pb


@pytest.fixture
def one_thread() -> Iterator[None]:
    """What `dress-agent join` runs with by default: timings on a shared 2-core box stay meaningful."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_calibration_covers_every_density_and_sparser_is_cheaper() -> None:
    packed = initial_model(architecture("cnn", "1,0.5,0.25,0.1", "fashion-mnist", 16))
    packed.set_density(0.5)
    points = calibrate(packed, image_shape(packed), repeats=15)
    assert [p.density for p in points] == [1.0, 0.5, 0.25, 0.1]  # densest first, as the registry stores it
    assert packed.active_density == 0.5  # restored
    by_density = {p.density: p for p in points}
    assert all(p.latency_ms > 0 for p in points)
    assert by_density[0.1].latency_ms < by_density[1.0].latency_ms * 1.5  # weakly: timing noise is real
    memory = [p.memory_mb for p in points]
    assert memory == sorted(memory, reverse=True) and len(set(memory)) == len(memory)
    activations = activation_bytes(packed, torch.zeros(1, 1, 28, 28))
    assert by_density[1.0].memory_mb == pytest.approx((packed.nbytes(1.0) + activations) / 2**20)
    # training: a step at batch 32 through the packed format costs more than a batch-1 pass, and holds more
    assert all(p.train_ms > p.latency_ms and p.train_memory_mb > p.memory_mb for p in points)
    training = [p.train_memory_mb for p in points]
    assert training == sorted(training, reverse=True)
    assert by_density[0.1].train_ms < by_density[1.0].train_ms * 1.5  # weakly, as above


def test_training_costs_leave_the_served_model_untouched() -> None:
    packed = initial_model(architecture("cnn", "1,0.25", "fashion-mnist", 8))
    before = {k: v.clone() for k, v in packed.net.state_dict().items()}
    costs = training_costs(packed, image_shape(packed), repeats=1, batch=4)
    assert set(costs) == {1.0, 0.25} and not packed.training
    assert all(torch.equal(before[k], v) for k, v in packed.net.state_dict().items())
    points = calibrate(packed, image_shape(packed), repeats=1, train_repeats=0)
    assert all(p.train_ms == 0 and p.train_memory_mb == 0 for p in points)  # not measured


def test_activation_peak_covers_the_largest_layer() -> None:
    packed = initial_model(architecture("cnn", "1,0.5", "fashion-mnist", 16))
    peak = activation_bytes(packed, torch.zeros(1, 1, 28, 28))
    assert peak >= 4 * (28 * 28 + 16 * 28 * 28)  # at least the stem's input and its 16-channel output


def test_initial_model_follows_the_described_architecture() -> None:
    packed = initial_model(architecture("cnn", "0.5,1", "cifar10", 8))
    assert packed.densities == (0.5, 1.0)
    assert (packed.arch.in_channels, packed.arch.image_size, packed.arch.width) == (3, 32, 8)
    assert packed(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_the_architecture_crosses_the_wire_unchanged() -> None:
    arch = architecture("cnn", "0.5,1", "cifar10", 8)
    assert architecture_from_proto(pb.Architecture.FromString(architecture_to_proto(arch).SerializeToString())) == arch


@pytest.mark.parametrize(("changes", "message"), [
    ({"name": "vgg"}, "unknown model 'vgg'"),
    ({"densities": [1.0, 1.5]}, "every density must be in (0, 1]"),
    ({"densities": [1.0, 0.5]}, "densities must be ascending"),
    ({"in_channels": 0}, "in_channels must be an integer in [1, 64]"),
    ({"image_size": 100_000}, "image_size must be an integer in [4, 4096]"),
    ({"bn_affine": ""}, "bn_affine must be 'per-density' or 'shared'"),
])
def test_an_architecture_this_build_cannot_make_is_a_value_error(changes: dict, message: str) -> None:
    wire = architecture_to_proto(architecture("cnn", "0.5,1", "mnist", 16))
    for field, value in changes.items():
        if field == "densities":
            del wire.densities[:]
            wire.densities.extend(value)
        else:
            setattr(wire, field, value)
    with pytest.raises(ValueError) as caught:
        architecture_from_proto(wire)
    assert message in str(caught.value)


def test_calibrate_refuses_no_repeats() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        calibrate(initial_model(architecture("cnn", "1", "mnist", 4)), (1, 28, 28), repeats=0)
