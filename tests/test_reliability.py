"""The reliability benchmark's short form: fuzzed packed files and control-plane requests, poisoned replies.

Each probe is seeded; a crash is anything but the refusal its layer promises (see benchmarks/reliability.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402


def test_fuzzed_packed_files_are_refused_never_crash() -> None:
    result = reliability.fuzz_packed(150, seed=1)
    assert result["crashes"] == 0, result["examples"]
    assert result["refused"] > 100  # the mutations really spoil files


def test_fuzzed_control_plane_requests_get_a_status_never_a_crash() -> None:
    result = reliability.fuzz_grpc(150, seed=1)
    assert result["crashes"] == 0, result["codes"]
    assert result["codes"].get("INVALID_ARGUMENT", 0) > 50 and result["still_serving"]


def test_poisoned_replies_of_every_kind_are_never_aggregated() -> None:
    result = reliability.poisoned(15, seed=1)  # each kind once
    assert result == {**result, "aggregated": 0, "crashes": 0}
    assert len(result["kinds"]) == 15


def test_strangers_of_every_kind_are_refused_by_the_control_plane_and_predict() -> None:
    result = reliability.control_plane_strangers(28, seed=1)  # each kind four times
    assert result["refused"] == result["tried"] == 28, result["codes"]
    assert set(result["codes"]) <= {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    result = reliability.predict_strangers(8, seed=1)  # each kind twice
    assert result["refused"] == result["tried"] == 8, result["codes"]
