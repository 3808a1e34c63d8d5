"""The reliability benchmark's short form: fuzzed packed files and control-plane requests, poisoned replies.

Each probe is seeded; a crash is anything but the refusal its layer promises (see benchmarks/reliability.py)."""

from __future__ import annotations

import pytest

from benchmarks import packed_fuzz, poisoned, strangers


def test_fuzzed_packed_files_are_refused_never_crash() -> None:
    result = packed_fuzz.fuzz_packed(150, seed=1)
    assert result["crashes"] == 0, result["examples"]
    assert result["refused"] > 100  # the mutations really spoil files


def test_crafted_packed_files_are_refused_quickly_without_allocating_what_they_declare() -> None:
    result = packed_fuzz.packed_crafted(12, seed=1)
    assert result["refused"] == result["tried"] == 12, result["examples"]
    assert result["max_s"] < 1 and result["max_extra_mb"] < 100, result


def test_fuzzed_control_plane_requests_get_a_status_never_a_crash() -> None:
    result = strangers.fuzz_grpc(150, seed=1)
    assert result["crashes"] == 0, result["codes"]
    assert result["codes"].get("INVALID_ARGUMENT", 0) > 50 and result["still_serving"]


def test_poisoned_replies_of_every_kind_are_never_aggregated() -> None:
    result = poisoned.poisoned(20, seed=1)  # each kind once
    assert result == {**result, "aggregated": 0, "crashes": 0}
    assert len(result["kinds"]) == 20


def test_poisoned_replies_are_never_aggregated_however_few_replies_a_round_has() -> None:
    result = poisoned.poisoned_by_replies(20, seed=1)  # each kind once in rounds of 1, 2 and 4 replies
    for size, honest in poisoned.REPLY_COUNTS.items():
        assert result[size] == {"tried": 20, "aggregated": 0, "honest_tried": 20 * honest,
                                "honest_aggregated": 20 * honest, "rolled_back": 0, "crashes": 0}, size
    assert result["model_plausible"]


def test_strangers_of_every_kind_are_refused_by_the_control_plane_and_predict() -> None:
    result = strangers.control_plane_strangers(28, seed=1)  # each kind four times
    assert result["refused"] == result["tried"] == 28, result["codes"]
    assert set(result["codes"]) <= {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    result = strangers.predict_strangers(8, seed=1)  # each kind twice
    assert result["refused"] == result["tried"] == 8, result["codes"]


def test_strangers_are_refused_on_every_route_of_the_operator_listener() -> None:
    kinds, routes = len(strangers.OPERATOR_STRANGERS), 8  # the dashboard, its script, metrics, 4 API routes, login
    result = strangers.operator_strangers(kinds * routes, seed=1)  # every kind on every route
    assert len(result["routes"]) == routes, result["routes"]
    assert result["refused"] == result["tried"] == kinds * routes, result["codes"]
    assert "200" not in result["codes"] and result["still_serving"]


def test_strangers_on_another_host_are_refused_at_the_public_superlink_address() -> None:
    """A TLS coordinator in a network namespace of its own; from another, the `flwr` CLI (run, stop, ls, supernode
    register/unregister) with the fleet's ca.pem and with nothing, raw HTTP on every route prefix and fuzzed Fleet
    requests are all refused, and the coordinator keeps its one run."""
    from benchmarks import superlink_strangers  # noqa: PLC0415 - only where namespaces can be made

    if reason := superlink_strangers.unavailable():
        pytest.skip(f"no network namespaces here: {reason}")
    result = superlink_strangers.superlink_strangers(10, seed=1)
    assert result["refused"] == result["tried"] > 100, result["let_through"]
    assert result["coordinator_alive"] and result["health_public"] == 200
