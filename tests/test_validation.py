"""Replies are checked before they count: shapes, dtypes, finiteness, example counts and update size."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from contracts.messages import train_config, upload_state
from contracts.settings import RunSettings, build_run_model
from coordinator.publisher import RoundPublisher
from coordinator.registry import Registry
from coordinator.strategy import DressStrategy, RoundStats
from coordinator.validation import Expected, RejectedUpdate, check_reply, norm_outliers

SENT = {"conv.values": torch.ones(6), "conv.indices": torch.arange(6, dtype=torch.int16), "bn.mean": torch.zeros(2, 3)}
EXPECTED = Expected(SENT, max_examples=500)


def reply(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{k: v.clone() for k, v in SENT.items()}, **changes}


def test_a_well_formed_reply_counts_and_its_update_norm_is_measured() -> None:
    assert check_reply(EXPECTED, reply(**{"conv.values": torch.full((6,), 2.0)}), 300) == pytest.approx(6 ** 0.5)
    assert check_reply(EXPECTED, reply(), 1.0) == 0.0  # Flower's metrics carry numbers as floats


@pytest.mark.parametrize(("tensors", "examples", "reason"), [
    (reply(**{"conv.values": torch.tensor([1.0, float("nan"), 1, 1, 1, 1])}), 10, "conv.values: not finite"),
    (reply(**{"conv.values": torch.tensor([1.0, float("inf"), 1, 1, 1, 1])}), 10, "conv.values: not finite"),
    (reply(**{"conv.values": torch.ones(5)}), 10, r"conv.values: torch.float32 \[5\], sent torch.float32 \[6\]"),
    (reply(**{"conv.values": torch.ones(6, dtype=torch.float64)}), 10, "torch.float64"),
    (reply(**{"bn.mean": torch.zeros(3, 2)}), 10, r"bn.mean: torch.float32 \[3, 2\]"),
    ({k: v for k, v in reply().items() if k != "bn.mean"}, 10, r"missing \['bn.mean'\]"),
    (reply(**{"extra": torch.zeros(1)}), 10, r"unexpected \['extra'\]"),
    (reply(), 10**12, "num-examples 1000000000000 outside"),
    (reply(), 0, "num-examples 0 outside"),
    (reply(), -5, "outside"),
    (reply(), 2.5, "must be an integer"),
    (reply(), "10", "must be an integer"),
    (reply(), True, "must be an integer"),
    (reply(), float("inf"), "must be an integer"),
    (reply(), float("nan"), "must be an integer"),
])
def test_bad_replies_are_rejected_with_the_reason(tensors: dict, examples: object, reason: str) -> None:
    with pytest.raises(RejectedUpdate, match=reason):
        check_reply(EXPECTED, tensors, examples)


def test_an_update_far_above_the_rounds_median_is_an_outlier() -> None:
    assert set(norm_outliers({1: 1.0, 2: 1.2, 3: 0.9, 4: 1e30})) == {4}
    assert norm_outliers({1: 1.0, 2: 1.2, 3: 0.9, 4: 9.0}) == {}  # under 10x the median
    assert norm_outliers({1: 1.0, 2: 1e30}) == {}  # two replies: no median to judge by
    assert "over 10× the round's median" in norm_outliers({1: 1.0, 2: 1.0, 3: 50.0})[3]


# -- the strategy: bad replies are dropped and recorded, the round goes on ---------------------------------


@pytest.fixture
def message_identity() -> Iterator[None]:
    """The identity Flower gives a ServerApp process (run, task, node), so real messages can be built here."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def run_round(sqlite_url: str, calibration: list, replies: dict[str, Callable[[dict], tuple[dict, object]]]):
    """One aggregation of DRESS strategy over real Flower messages: each named device replies what its function
    makes of the tensors it was sent (tensors, num-examples; None = no arrays at all)."""
    torch.manual_seed(0)
    model = build_run_model(RunSettings.defaults(width=4))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28),
                                                                        torch.randint(0, 10, (32,))), batch_size=16)
    with Registry(sqlite_url) as registry:
        for name in replies:
            registry.register_device(name, "pi4", calibration)
        infos = {d.name: d for d in registry.list_devices()}
        strategy = DressStrategy(model, registry, loader, fraction=1.0, min_devices=1, seed=0,
                                 stale_after=timedelta(seconds=30), max_examples=300)
        strategy.stats[1] = RoundStats(1)
        nodes = {100 + i: name for i, name in enumerate(replies)}
        strategy.node_devices = dict(nodes)
        sent = strategy.messages_for(1, [(node, infos[name], 0.1) for node, name in nodes.items()],
                                     train_config(RunSettings.defaults()))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        answers = []
        for message in sent:
            node = message.metadata.dst_node_id
            tensors, examples = replies[nodes[node]](upload_state(strategy.sent[node].payload))
            content = {"metrics": MetricRecord({"num-examples": examples, "compute-s": 0.5})}
            if tensors is not None:
                content["arrays"] = ArrayRecord(torch_state_dict=tensors)
            TaskIdentity.node_id = node
            answers.append(Message(RecordDict(content), reply_to=message))
        TaskIdentity.node_id = 1
        arrays, metrics = strategy.aggregate_train(1, answers)
    return strategy.stats[1], before, arrays.to_torch_state_dict(), metrics


def nudged(tensors: dict) -> dict:
    return {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}


def first_values(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith(".values"))


def with_first(tensors: dict, change: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    tensors = nudged(tensors)
    tensors[first_values(tensors)] = change(tensors[first_values(tensors)])
    return tensors


def test_bad_replies_are_dropped_and_recorded_while_good_ones_count(
    sqlite_url: str, calibration: list, message_identity: None
) -> None:
    honest = lambda t: (nudged(t), 100)  # noqa: E731
    stats, before, after, metrics = run_round(sqlite_url, calibration, {
        "good-1": honest, "good-2": honest, "good-3": honest,
        "nan": lambda t: (with_first(t, lambda v: v.clone().index_fill_(0, torch.tensor([0]), float("nan"))), 100),
        "short": lambda t: (with_first(t, lambda v: v[:-1].clone()), 100),
        "huge": lambda t: (with_first(t, lambda v: v * 1e6), 100),
        "liar": lambda t: (nudged(t), 10**12),
        "no-arrays": lambda t: (None, 100),
    })
    assert metrics["participants"] == 3 and {name for name, _ in stats.participants.values()} == {"good-1", "good-2", "good-3"}
    assert set(stats.rejected) == {"nan", "short", "huge", "liar", "no-arrays"}
    assert "not finite" in stats.rejected["nan"] and "sent" in stats.rejected["short"]
    assert "median" in stats.rejected["huge"] and "num-examples" in stats.rejected["liar"]
    assert "malformed reply" in stats.rejected["no-arrays"]
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(after[k], before[k]) for k in before) and stats.withheld is None


def test_a_round_whose_aggregate_is_not_finite_is_rolled_back(sqlite_url: str, calibration: list,
                                                              message_identity: None) -> None:
    """Each reply passes its checks, together they overflow: the global model stays as it was."""
    colluding = lambda t: ({k: v.clone().fill_(3e38) if v.is_floating_point() else v for k, v in t.items()}, 100)  # noqa: E731
    stats, before, after, _ = run_round(sqlite_url, calibration, {f"c{i}": colluding for i in range(3)})
    assert stats.withheld and "rolled back" in stats.withheld
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- the publisher: a round nobody trained, not finite, or whose accuracy collapsed never reaches the fleet -


def test_a_diverged_or_collapsed_round_is_not_published(sqlite_url: str, calibration: list, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_run_model(RunSettings.defaults(width=4))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(256, 1, 28, 28)
    model.eval()
    model.set_density(1.0)
    with torch.no_grad():
        labels = model(images).argmax(1)  # a test set the round-1 model gets entirely right at d=1
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64)
    with Registry(sqlite_url) as registry:
        pi = registry.register_device("pi", "pi4", calibration).device_id
        stats = {r: RoundStats(r, participants={pi: ("pi", 0.1)}) for r in (1, 2, 3, 4)}
        stats[5] = RoundStats(5)  # every device dropped out or was rejected
        publisher = RoundPublisher(model, registry, test, tmp_path / "checkpoints", stats)
        publisher(1, ArrayRecord(torch_state_dict=good))
        assert registry.current_model_version() == "round-1" and stats[1].withheld is None
        poisoned = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in good.items()}
        publisher(2, ArrayRecord(torch_state_dict=poisoned))
        assert registry.current_model_version() == "round-1" and stats[2].withheld == "weights are not finite"
        torch.manual_seed(1)
        other = build_run_model(RunSettings.defaults(width=4)).state_dict()  # another init: round 1's labels lost
        publisher(3, ArrayRecord(torch_state_dict=other))
        assert registry.current_model_version() == "round-1" and "accuracy collapsed" in stats[3].withheld
        publisher(4, ArrayRecord(torch_state_dict=good))
        assert registry.current_model_version() == "round-4"
        publisher(5, ArrayRecord(torch_state_dict=good))
        assert registry.current_model_version() == "round-4" and "no device" in stats[5].withheld
        withheld = {r.round: r.details["withheld"] for r in registry.list_rounds()}
    assert withheld[1] is None and withheld[4] is None and withheld[2] and withheld[3] and withheld[5]


def test_each_round_sends_its_own_learning_rate_and_anchor_weight(sqlite_url: str, calibration: list,
                                                                  message_identity: None) -> None:
    settings = RunSettings.defaults(width=4, num_rounds=10, distill_decay=0.0)
    model = build_run_model(settings)
    with Registry(sqlite_url) as registry:
        registry.register_device("pi", "pi4", calibration)
        [info] = registry.list_devices()
        strategy = DressStrategy(model, registry, None, fraction=1.0, min_devices=1, seed=0,  # type: ignore[arg-type]
                                 stale_after=timedelta(seconds=30), max_examples=300,
                                 round_config=lambda r: {"lr": settings.lr_at(r), "distill": settings.distill_at(r)})
        for round_number in (1, 10):
            strategy.stats[round_number] = RoundStats(round_number)
            [message] = strategy.messages_for(round_number, [(100, info, 0.1)], train_config(settings))
            config = message.content["config"]
            assert config["lr"] == pytest.approx(settings.lr_at(round_number))
            assert config["distill"] == pytest.approx(settings.distill_at(round_number))
    assert settings.distill_at(10) == 0.0 < settings.distill_at(1)
