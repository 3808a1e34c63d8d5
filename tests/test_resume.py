"""A restarted coordinator continues its run: round numbers go on, versions stay unique, the model is the last
one published; a round is recorded and published together or not at all."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from contracts.settings import RunSettings, build_run_model
from coordinator.fleet_strategy import RoundStats
from coordinator.publisher import RoundPublisher
from coordinator.registry import Registry
from coordinator.registry.errors import InvalidInputError
from coordinator.server_app import resume


def _model(seed: int, width: int = 4):
    torch.manual_seed(seed)
    return build_run_model(RunSettings.defaults(width=width))


def _test_loader():
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    return torch.utils.data.DataLoader(data, batch_size=32)


def _publish(registry: Registry, model, tmp_path, rounds: range, device: int, first_round: int = 1) -> RoundPublisher:
    stats = {r: RoundStats(r, participants={device: ("pi", 0.1)}) for r in rounds}
    publisher = RoundPublisher(model, registry, _test_loader(), tmp_path / "checkpoints", stats,
                               first_round=first_round)
    for r in rounds:
        with torch.no_grad():
            model.fc2.weight.add_(1.0)  # every round moves the model
        publisher(r - first_round + 1, ArrayRecord(torch_state_dict=model.state_dict()))
    return publisher


def test_a_restart_resumes_from_the_last_published_round(sqlite_url: str, calibration: list, tmp_path) -> None:
    with Registry(sqlite_url) as registry:
        device = registry.register_device("pi", "pi4", calibration).device_id
        first = _model(0)
        _publish(registry, first, tmp_path, range(1, 4), device)
        fresh = _model(1)  # what a restarted ServerApp builds before resuming
        done, best = resume(registry, fresh)
        assert done == 3 and best is not None
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), first.state_dict().values()))
        # the resumed run's Flower rounds 1, 2 are the run's rounds 4, 5
        _publish(registry, fresh, tmp_path, range(4, 6), device, first_round=4)
        assert [r.round for r in registry.list_rounds()] == [1, 2, 3, 4, 5]
        assert registry.current_model_version() == "round-5"
        assert registry.model_checkpoint("round-4").endswith("round-4.safetensors")


def test_a_fresh_state_directory_starts_at_round_one(sqlite_url: str) -> None:
    with Registry(sqlite_url) as registry:
        assert resume(registry, _model(0)) == (0, None)


def test_resuming_a_different_model_is_refused(sqlite_url: str, calibration: list, tmp_path) -> None:
    with Registry(sqlite_url) as registry:
        device = registry.register_device("pi", "pi4", calibration).device_id
        _publish(registry, _model(0), tmp_path, range(1, 2), device)
        with pytest.raises(ValueError, match="new state directory"):
            resume(registry, _model(0, width=8))


def test_a_round_and_its_version_are_stored_together(sqlite_url: str, calibration: list) -> None:
    """Publishing a version that exists fails the whole round: no round row without its version, or the reverse."""
    with Registry(sqlite_url) as registry:
        device = registry.register_device("pi", "pi4", calibration).device_id
        registry.record_round(1, {device: 0.1}, {0.1: {"accuracy": 50.0}}, 0, 0, model_version="round-1",
                              published=("/ckpt/round-1", (0.1, 1.0)))
        with pytest.raises(InvalidInputError, match="round-1"):
            registry.record_round(2, {device: 0.1}, {0.1: {"accuracy": 50.0}}, 0, 0, model_version="round-1",
                                  published=("/ckpt/round-1", (0.1, 1.0)))
        assert registry.last_round() == 1 and registry.current_model_version() == "round-1"
