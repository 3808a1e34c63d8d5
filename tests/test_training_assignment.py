"""Which density a device trains: its assignment, unless its calibrated training cost does not fit it."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from contracts.methods import get_method
from contracts.policy import Budget, CalibrationPoint
from coordinator.peers import WidthStrategy
from coordinator.registry.models import DeviceStatus
from coordinator.registry.records import DeviceInfo
from coordinator.strategy import DressStrategy
from dress_model.models import create_model

NOW = datetime.now(timezone.utc)
# a step at batch 32: 1.0 takes 400 ms and 1000 MB, 0.5 200 / 500, 0.25 100 / 250, 0.1 40 / 100
CALIBRATION = tuple(CalibrationPoint(d, 10 * d, 100 * d, 400 * d, 1000 * d) for d in (1.0, 0.5, 0.25, 0.1))


def device(density: float, memory_mb: float | None, calibration=CALIBRATION) -> DeviceInfo:
    budget = None if memory_mb is None else Budget(50.0, memory_mb)
    return DeviceInfo(1, "pi-1", "pi4", None, DeviceStatus.ONLINE, density, NOW, NOW, budget, calibration)


def strategy(kind: type = DressStrategy, timeout_s: float | None = 3600.0, steps: int | None = None):
    model = create_model("cnn", "0.1,0.25,0.5,1", width=4)
    common = dict(fraction=1.0, min_devices=1, seed=0, heartbeat_s=5.0, max_examples=300,
                  round_timeout_s=timeout_s)
    s = (DressStrategy(model, None, None, **common) if kind is DressStrategy  # type: ignore[arg-type]
         else WidthStrategy(get_method("heterofl"), model, None, None, **common))  # type: ignore[arg-type]
    s.train_steps = steps
    return s


@pytest.mark.parametrize(("assigned", "memory_mb", "steps", "expected"), [
    (1.0, 4000.0, 10, 1.0),  # fits: trains what it serves
    (1.0, 600.0, 10, 0.5),  # its last budget's memory holds a d=0.5 step, not d=1
    (0.5, None, 10, 0.5),  # no budget reported yet: memory is not held against it
    (1.0, 4000.0, 36_000, 0.25),  # 36,000 steps in the hour: 100 ms each at most
    (1.0, 50.0, 10, None),  # not even d=0.1 fits: it sits the round out
])
def test_training_density_fits_the_device(assigned, memory_mb, steps, expected) -> None:
    assert strategy(steps=steps).training_density(device(assigned, memory_mb)) == expected


def test_without_measured_training_costs_a_device_trains_its_assignment() -> None:
    unmeasured = tuple(CalibrationPoint(d, 10 * d, 100 * d) for d in (1.0, 0.5, 0.25, 0.1))
    assert strategy(steps=10**9).training_density(device(0.5, 1.0, unmeasured)) == 0.5
    assert strategy().training_density(device(0.25, 1.0, ())) == 0.25


def test_peers_get_the_same_training_fit() -> None:
    """A peer's device trains the level of the tier that fits it, by the same rule."""
    peer = strategy(WidthStrategy, steps=10)
    assert peer.training_density(device(1.0, 600.0)) == peer.density_for(0.5)


class FakeGrid:
    """The one Grid call sampling makes besides status queries: which nodes are connected (node ids shuffled
    per run, as Flower draws them)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.mark.parametrize("kind", [DressStrategy, WidthStrategy])
def test_every_method_draws_the_same_devices_in_a_round_whatever_its_node_ids(kind) -> None:
    """Paired comparisons: the draw depends on the seed, the round and who is online — not on the method, nor on
    the node ids Flower gave this run; a drawn device the method cannot train sits out, nobody replaces it."""
    import random

    names = [f"sim-{i:03d}" for i in range(40)]
    devices = {n: DeviceInfo(i, n, "pi4", None, DeviceStatus.ONLINE if i % 5 else DeviceStatus.OFFLINE,
                             1.0 if i % 3 else 0.3, NOW, NOW, None, ())
               for i, n in enumerate(names)}
    drawn = {}
    for run, ids in enumerate((range(1000, 1040), range(7000, 7040))):
        s = strategy(kind)
        nodes = list(ids)
        random.Random(run).shuffle(nodes)
        s.membership.node_devices = dict(zip(nodes, names))  # what status queries would have told it
        chosen = s.membership.sample(FakeGrid(nodes), devices, 8, random.Random(11), s.training_density)
        drawn[run] = [info.name for _, info, _ in chosen]
        assert all(s.membership.node_devices[node] == info.name for node, info, _ in chosen)
        assert all(devices[name].status == DeviceStatus.ONLINE for name in drawn[run])
    assert drawn[0] == drawn[1]
    assert len(drawn[0]) < 8  # tier 0.3 is none of the model's: those drawn sit the round out
