"""Staged rollouts: a new version goes to its canary share first, through the real control plane (heartbeat answers
and downloads); the judge promotes it or rolls it back from what devices report serving; operators decide by hand
with `dress-fleet models`; an agent never serves a version that does not answer."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import architecture, enrolled
from typer.testing import CliRunner

from agent.calibration import initial_model
from agent.model_fetch import FetchedModel, ModelFetchError, check_answers
from cli.fleet import app
from contracts.policy import Budget, CalibrationPoint
from coordinator.control_plane import serve
from coordinator.registry import InvalidInputError, Registry, store
from coordinator.registry.models import VersionStatus
from coordinator.registry.rollouts import in_canary
from coordinator.rollout import MIN_REQUESTS, judge
from protos.dress.fleet.v1 import control_plane_pb2 as pb

ARCH = architecture("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 4)
POINTS = [CalibrationPoint(d, 100 * d, 800 * d) for d in ARCH.densities]
DENSITIES = (1.0, 0.5, 0.25, 0.1)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(state_dir=tmp_path / "state") as registry:
        yield registry


def _fleet(registry: Registry, count: int) -> dict[str, int]:
    """``count`` registered devices: name -> id."""
    return {name: registry.enroll_device(token, name, "laptop-x86", POINTS)[0].device_id
            for name, token in registry.enroll([f"dev-{i:03d}" for i in range(count)]).items()}


def test_a_version_goes_to_its_canary_share_first_and_a_newer_candidate_supersedes_it(registry: Registry) -> None:
    names = list(_fleet(registry, 200))
    registry.add_model_version("v1", "/m/v1", DENSITIES, canary=0.1)  # nothing to compare with: promoted
    registry.add_model_version("v2", "/m/v2", DENSITIES, canary=0.1)
    assert registry.rollout() == ("v1", "v2", 0.1)
    on_v2 = [n for n in names if registry.version_for(n) == "v2"]
    assert 8 <= len(on_v2) <= 35 and all(registry.version_for(n) == "v1" for n in names if n not in on_v2)
    assert on_v2 == [n for n in names if in_canary(n, "v2", 0.1)]  # the same devices every time
    registry.add_model_version("v3", "/m/v3", DENSITIES, canary=0.1)
    statuses = {v.version: v.status for v in registry.list_versions()}
    assert statuses == {"v1": VersionStatus.PROMOTED, "v2": VersionStatus.SUPERSEDED, "v3": VersionStatus.CANDIDATE}
    assert {registry.version_for(n) for n in names} == {"v1", "v3"}
    registry.add_model_version("v4", "/m/v4", DENSITIES)  # rollouts off: straight to the fleet
    assert {registry.version_for(n) for n in names} == {"v4"} and registry.rollout() == ("v4", None, 0.0)


def test_the_control_plane_answers_and_serves_each_device_its_version(registry: Registry, free_port: int) -> None:
    asked: list[str] = []

    def provider(version: str, density: float, half: bool) -> bytes:
        asked.append(version)
        return version.encode()

    registry.add_model_version("v1", "/m/v1", DENSITIES, canary=0.5)
    registry.add_model_version("v2", "/m/v2", DENSITIES, canary=0.5)
    server = serve(registry, "127.0.0.1", free_port, ARCH, provider)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{free_port}") as channel:
            for name in ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e", "dev-f"):
                device = enrolled(channel, registry, name)
                device.Register(pb.RegisterRequest(name=name, profile="laptop-x86", calibration=[
                    pb.CalibrationPoint(level=level, latency_ms=100 * d, memory_mb=800 * d)
                    for level, d in enumerate(ARCH.densities)]))
                expected = "v2" if in_canary(name, "v2", 0.5) else "v1"
                answer = device.Heartbeat(pb.HeartbeatRequest(budget=pb.Budget(latency_ms=1000, memory_mb=4000)))
                assert answer.model_version == expected
                chunks = list(device.FetchModel(pb.FetchModelRequest(level=3)))
                assert chunks[0].model_version == expected and b"".join(c.data for c in chunks) == expected.encode()
        assert set(asked) == {"v1", "v2"}  # six devices at a half share: both versions went out
    finally:
        server.stop(grace=None).wait()


def _report(registry: Registry, ids: dict[str, int], version: str, requests: int, ms: float,
            confidence: float) -> None:
    """What Predict ran on the devices serving ``version``, as their heartbeats report it."""
    for name, device_id in ids.items():
        if registry.version_for(name) == version:
            registry.heartbeat(device_id, Budget(1000, 4000), {1.0: (requests, requests * ms, requests * confidence)},
                               version)


@pytest.mark.parametrize(("confidence", "ms", "promoted"), [(0.90, 2.0, True), (0.70, 2.0, False), (0.90, 5.0, False)])
def test_the_judge_promotes_a_candidate_that_holds_up_and_rolls_back_one_that_regresses(
        registry: Registry, confidence: float, ms: float, promoted: bool) -> None:
    ids = _fleet(registry, 60)
    registry.add_model_version("v1", "/m/v1", DENSITIES, canary=0.2)
    registry.add_model_version("v2", "/m/v2", DENSITIES, canary=0.2)
    assert judge(registry) is None  # no evidence yet
    _report(registry, ids, "v1", 5, 2.0, 0.9)
    canary = sum(registry.version_for(n) == "v2" for n in ids)
    assert 0 < canary < MIN_REQUESTS
    _report(registry, ids, "v2", 1, ms, confidence)  # a request from each canary device: too little to judge
    assert judge(registry) is None
    _report(registry, ids, "v2", MIN_REQUESTS, ms, confidence)
    liar = next(i for n, i in ids.items() if registry.version_for(n) == "v1")  # claims the candidate's requests
    registry.heartbeat(liar, Budget(1000, 4000), {1.0: (10**6, 10**9, 10**5)}, "v2")
    verdict = judge(registry)
    assert verdict is not None and verdict.version == "v2" and verdict.promote is promoted, verdict
    status = {v.version: v for v in registry.list_versions()}["v2"]
    assert status.status == (VersionStatus.PROMOTED if promoted else VersionStatus.ROLLED_BACK)
    assert status.reason == verdict.reason and status.decided_at is not None
    expected = "v2" if promoted else "v1"
    assert {registry.version_for(n) for n in ids} == {expected}  # the whole fleet, or nobody, serves it
    if not promoted:
        assert ("confidence" in verdict.reason) == (confidence < 0.85) and ("ms a request" in verdict.reason) == (ms > 3)


def test_operators_list_promote_and_roll_back_by_hand(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Registry(state_dir=state) as registry:
        registry.add_model_version("round-1", "/m/1", DENSITIES, canary=0.1)
        registry.add_model_version("round-2", "/m/2", DENSITIES, canary=0.1)
        _check(registry, list(_fleet(registry, 2).values()), "round-1", {1.0: 200, 0.5: 192})
    runner = CliRunner(env={"COLUMNS": "250"})
    listed = runner.invoke(app, ["models", "list", "--state-dir", str(state)])
    assert listed.exit_code == 0 and "stable round-1, candidate round-2" in listed.output
    assert "76.6 % on 2 devices" in listed.output, listed.output  # (200 + 192) / 512: what their checks gave
    promoted = runner.invoke(app, ["models", "promote", "round-2", "--state-dir", str(state)])
    assert promoted.exit_code == 0 and "promoted" in promoted.output
    again = runner.invoke(app, ["models", "promote", "round-2", "--state-dir", str(state)])
    assert again.exit_code == 2 and "promoted already" in again.output
    back = runner.invoke(app, ["models", "rollback", "round-2", "--state-dir", str(state)])
    assert back.exit_code == 0 and "rolled back" in back.output
    with Registry(state_dir=state) as registry:
        assert registry.rollout() == ("round-1", None, 0.0) and registry.version_for("any") == "round-1"
    missing = runner.invoke(app, ["models", "rollback", "round-9", "--state-dir", str(state)])
    assert missing.exit_code == 2 and "no model version 'round-9'" in missing.output


def test_an_agent_never_serves_a_version_that_does_not_answer() -> None:
    packed = initial_model(ARCH)
    check_answers(FetchedModel("good", packed, 0))  # finite logits at every density
    with torch.no_grad():
        for tensor in [*packed.parameters(), *packed.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(math.nan)
    with pytest.raises(ModelFetchError, match="does not answer at density"):
        check_answers(FetchedModel("broken", packed, 0))


def test_one_canary_device_cannot_swing_the_verdict(registry: Registry) -> None:
    """A canary device that reports a flood of unsure answers (broken, or lying about its own version) is one
    device: each side is judged by the median over its devices."""
    ids = _fleet(registry, 60)
    registry.add_model_version("v1", "/m/v1", DENSITIES, canary=0.2)
    registry.add_model_version("v2", "/m/v2", DENSITIES, canary=0.2)
    _report(registry, ids, "v1", 5, 2.0, 0.9)
    _report(registry, ids, "v2", 5, 2.0, 0.9)
    loud = next(i for n, i in ids.items() if registry.version_for(n) == "v2")
    registry.heartbeat(loud, Budget(1000, 4000), {1.0: (10**6, 10**9, 0.0)}, "v2")
    verdict = judge(registry)
    assert verdict is not None and verdict.promote, verdict


def _check(registry: Registry, device_ids: list[int], version: str, correct: dict[float, int]) -> None:
    """Each device's labelled check of ``version`` (256 images), as its next heartbeat reports it."""
    for device_id in device_ids:
        registry.heartbeat(device_id, Budget(1000, 4000), checks={(version, d): (256, n) for d, n in correct.items()})


@pytest.mark.parametrize("candidate_correct", [{1.0: 231, 0.5: 219}, {1.0: 60, 0.5: 58}])
def test_labelled_checks_roll_back_a_version_sure_of_wrong_answers(
        registry: Registry, candidate_correct: dict[float, int]) -> None:
    """Predict's confidence is the same for both versions (a model sure of wrong answers looks healthy there);
    the canary devices' labelled checks, paired with their own checks of the stable version, are not."""
    regressed = candidate_correct[1.0] < 200
    ids = _fleet(registry, 60)
    registry.add_model_version("v1", "/m/v1", DENSITIES, canary=0.2)
    _check(registry, list(ids.values()), "v1", {1.0: 230, 0.5: 220})  # each device checked v1 when it got it
    registry.add_model_version("v2", "/m/v2", DENSITIES, canary=0.2)
    canary = [i for n, i in ids.items() if registry.version_for(n) == "v2"]
    _check(registry, canary, "v2", candidate_correct)
    verdict = judge(registry)
    if regressed:  # at once, before any Predict traffic
        assert verdict is not None and not verdict.promote and verdict.reason.startswith("regressed on labelled checks")
        assert f"on {len(canary)} canary devices" in verdict.reason and "23.0 % against the stable version's 87.9 %" in verdict.reason, verdict
        assert {registry.version_for(n) for n in ids} == {"v1"}
        return
    assert verdict is None  # checks that hold up never promote alone: Predict traffic must too
    _report(registry, ids, "v1", 5, 2.0, 0.9)
    _report(registry, ids, "v2", MIN_REQUESTS, 2.0, 0.9)
    verdict = judge(registry)
    assert verdict is not None and verdict.promote and "labelled checks on" in verdict.reason, verdict


def test_one_device_checking_badly_cannot_roll_a_version_back(registry: Registry) -> None:
    ids = _fleet(registry, 60)
    registry.add_model_version("v1", "/m/v1", DENSITIES, canary=0.2)
    _check(registry, list(ids.values()), "v1", {1.0: 230})
    registry.add_model_version("v2", "/m/v2", DENSITIES, canary=0.2)
    loud, *rest = [i for n, i in ids.items() if registry.version_for(n) == "v2"]
    _check(registry, [loud], "v2", {1.0: 0})
    _check(registry, rest, "v2", {1.0: 229})
    _report(registry, ids, "v1", 5, 2.0, 0.9)
    _report(registry, ids, "v2", MIN_REQUESTS, 2.0, 0.9)
    verdict = judge(registry)
    assert verdict is not None and verdict.promote, verdict


@pytest.mark.parametrize(("checks", "message"), [
    ({("v1", 1.0): (256, 257)}, "correct must be 0..256"),
    ({("v1", 1.0): (0, 0)}, "examples must be"),
    ({("v1", 1.5): (256, 3)}, "density"),
    ({("", 1.0): (256, 3)}, "model version"),
    ({("v7", 1.0): (256, 3)}, "never published"),
])
def test_a_check_the_registry_cannot_trust_is_refused_with_the_whole_heartbeat(
        registry: Registry, checks: dict[tuple[str, float], tuple[int, int]], message: str) -> None:
    [device_id] = _fleet(registry, 1).values()
    registry.add_model_version("v1", "/m/v1", DENSITIES)
    before = registry.get_device(device_id).last_budget
    with pytest.raises(InvalidInputError, match=message):
        registry.heartbeat(device_id, Budget(1000, 1234), checks=checks)
    assert registry.get_device(device_id).last_budget == before and registry.checked_accuracy(["v1", "v7"]) == {}


def test_heartbeats_see_this_process_publish_at_once_and_another_within_the_rollout_ttl(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "ROLLOUT_TTL_S", 0.3)
    with Registry(state_dir=tmp_path / "state") as coordinator, Registry(state_dir=tmp_path / "state") as operator:
        [device_id] = _fleet(coordinator, 1).values()
        coordinator.add_model_version("v1", "/m/v1", DENSITIES)
        assert coordinator.heartbeat(device_id, Budget(1000, 4000)).model_version == "v1"  # its own: at once
        operator.add_model_version("v2", "/m/v2", DENSITIES)  # another process (`dress-fleet models`, a script)
        assert coordinator.heartbeat(device_id, Budget(1000, 4000)).model_version == "v1"  # read < 0.3 s ago
        time.sleep(0.35)
        assert coordinator.heartbeat(device_id, Budget(1000, 4000)).model_version == "v2"
