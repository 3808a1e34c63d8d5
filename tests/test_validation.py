"""Replies are checked before they count: shapes, dtypes, finiteness, example counts, update size against the
model they were sent and against the round's other replies, BN statistics; so are aggregates and published
models."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from agent.client_app import train_subnet
from contracts.messages import train_config
from contracts.methods import METHODS, get_method
from contracts.settings import RunSettings, build_run_model
from coordinator.aggregation import Update
from coordinator.fleet_strategy import RoundStats
from coordinator.peers import WidthStrategy
from coordinator.publisher import RoundPublisher
from coordinator.registry import Registry
from coordinator.strategy import DressStrategy
from coordinator.validation import STATISTICS, Expected, RejectedUpdate, check_reply, implausible, size_outliers
from runtime.task_identity import task_identity

SENT = {"conv.values": torch.ones(6), "conv.indices": torch.arange(6, dtype=torch.int16), "bn.mean": torch.zeros(2, 3)}
EXPECTED = Expected(SENT, max_examples=500)


def reply(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{k: v.clone() for k, v in SENT.items()}, **changes}


def test_a_well_formed_reply_counts_and_its_update_size_is_measured_per_weight() -> None:
    """The root mean square of what moved, over learned tensors: BN statistics and integer indices left out."""
    assert check_reply(EXPECTED, reply(**{"conv.values": torch.full((6,), 2.0)}), 300) == pytest.approx((6 / 12) ** 0.5)
    assert check_reply(EXPECTED, reply(), 1.0) == 0.0  # Flower's metrics carry numbers as floats
    moved = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    assert check_reply(EXPECTED, reply(**{"conv.values": moved}), 300) == pytest.approx((4 / 12) ** 0.5)  # 12 floats
    statistics = {"conv.values": torch.ones(6), "bn.running_var": torch.ones(3)}
    assert check_reply(Expected(statistics, 500), {**statistics, "bn.running_var": torch.full((3,), 9.0)}, 300) == 0.0


def test_a_capable_device_s_honest_update_is_no_outlier_beside_weak_ones() -> None:
    """Weak devices move 10 weights, a capable one 1,000 by as much each: its L2 norm is 10× theirs, its size the
    same; the same reply scaled 20× is an outlier."""
    weak, capable = Expected({"w": torch.zeros(10)}, 500), Expected({"w": torch.zeros(1000)}, 500)
    sizes = {i: check_reply(weak, {"w": torch.full((10,), 0.01 * (1 + i / 10))}, 100) for i in range(3)}
    sizes[3] = check_reply(capable, {"w": torch.full((1000,), 0.011)}, 100)
    assert size_outliers(sizes) == {}
    sizes[3] = check_reply(capable, {"w": torch.full((1000,), 0.22)}, 100)
    assert set(size_outliers(sizes)) == {3}


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


BN = {"conv.values": torch.ones(6), "bn.running_mean": torch.zeros(2, 3), "bn.running_var": torch.ones(2, 3)}


@pytest.mark.parametrize(("change", "reason"), [
    ({"conv.values": torch.full((6,), 7.0)}, r"update norm 6× the norm of the weights it moves, over 5×"),
    ({"conv.values": torch.full((6,), -5.0)}, r"update norm 6×"),  # reversed
    ({"bn.running_var": torch.full((2, 3), 2e4)}, r"bn.running_var: variance 2e\+04 over 1e\+04"),
    ({"bn.running_var": torch.full((2, 3), -1e-3)}, r"bn.running_var: negative variance"),
    ({"bn.running_mean": torch.full((2, 3), -1e3)}, r"bn.running_mean: mean 1e\+03 over 100"),
    ({"bn.running_mean": torch.full((2, 3), float("inf"))}, r"bn.running_mean: not finite"),
])
def test_what_honest_training_cannot_make_of_a_model_is_implausible(change: dict, reason: str) -> None:
    assert re.search(reason, implausible(BN, {**BN, **change}) or "")


def test_what_honest_training_can_make_of_a_model_is_plausible_at_the_models_own_scale() -> None:
    assert implausible(BN, {**BN, "conv.values": torch.full((6,), 5.0)}) is None  # moved 4× its norm
    assert implausible(BN, {**BN, "bn.running_var": torch.zeros(2, 3)}) is None  # a channel constant over the data
    wide = {**BN, "bn.running_var": torch.full((2, 3), 100.0)}  # activations of size 10: bounds of 1000 and 1000²
    assert implausible(wide, {**wide, "bn.running_var": torch.full((2, 3), 9e5),
                              "bn.running_mean": torch.full((2, 3), -900.0)}) is None
    assert "variance" in implausible(wide, {**wide, "bn.running_var": torch.full((2, 3), 2e6)})
    assert implausible({}, BN) is None  # no reference: a fresh model's statistics, no weights to compare


def test_an_update_far_above_the_rounds_median_is_an_outlier() -> None:
    assert set(size_outliers({1: 1.0, 2: 1.2, 3: 0.9, 4: 1e30})) == {4}
    assert size_outliers({1: 1.0, 2: 1.2, 3: 0.9, 4: 9.0}) == {}  # under 10x the median
    assert size_outliers({1: 1.0, 2: 1e30}) == {}  # two replies: no median to judge by
    assert "over 10× the round's median" in size_outliers({1: 1.0, 2: 1.0, 3: 50.0})[3]


# -- the strategy: bad replies are dropped and recorded, the round goes on ---------------------------------


@pytest.fixture
def message_identity() -> Iterator[None]:
    """The identity Flower gives a ServerApp process (run, task, node), so real messages can be built here."""
    with task_identity():
        yield


Reply = Callable[[dict[str, torch.Tensor]], tuple[dict | None, object]]


def run_round(sqlite_url: str, calibration: list, replies: dict[str, Reply | None], *, method: str = "dress",
              tiers: dict[str, float] | None = None, strategy_type: type[DressStrategy] = DressStrategy):
    """One aggregation of the method's strategy over real Flower messages: each named device the method trains at
    its tier (else 0.1) replies what its function makes of the tensors it was sent (tensors, num-examples; None =
    no arrays at all), or, given None for a function, what the fleet's ClientApp trains (64 Fashion-MNIST images
    at ten times the default learning rate)."""
    settings = RunSettings.defaults(width=4, method=method, max_examples=64, lr=0.5)
    torch.manual_seed(0)
    model = build_run_model(settings)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28),
                                                                        torch.randint(0, 10, (32,))), batch_size=16)
    with Registry(sqlite_url) as registry:
        for name in replies:
            registry.register_device(name, "pi4", calibration)
        infos = {d.name: d for d in registry.list_devices()}
        common = dict(fraction=1.0, min_devices=1, seed=0, heartbeat_s=5.0, max_examples=300)
        strategy = (strategy_type(model, registry, loader, **common) if method == "dress"
                    else WidthStrategy(get_method(method), model, registry, loader, **common))
        strategy.stats[1] = RoundStats(1)
        nodes = {100 + i: name for i, name in enumerate(replies)}
        strategy.membership.node_devices = dict(nodes)
        trains = {node: strategy.density_for((tiers or {}).get(name, 0.1)) for node, name in nodes.items()}
        chosen = [(node, infos[nodes[node]], density) for node, density in trains.items() if density is not None]
        sent = strategy.messages_for(1, chosen, train_config(settings))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        answers = []
        for i, message in enumerate(sent):
            node = message.metadata.dst_node_id
            TaskIdentity.node_id = node
            if (reply := replies[nodes[node]]) is None:
                context = Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": len(sent)},
                                  state=RecordDict(), run_config=settings.to_run_config())
                answers.append(train_subnet(message, context))
                continue
            tensors, examples = reply(strategy.sent[node].expected.tensors)
            content = {"metrics": MetricRecord({"num-examples": examples, "compute-s": 0.5, "classes": list(range(10))})}
            if tensors is not None:
                content["arrays"] = ArrayRecord(torch_state_dict=tensors)
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


def honest(sent: dict) -> tuple[dict, object]:
    return nudged(sent), 100


def test_bad_replies_are_dropped_and_recorded_while_good_ones_count(
    sqlite_url: str, calibration: list, message_identity: None
) -> None:
    stats, before, after, metrics = run_round(sqlite_url, calibration, {
        "good-1": honest, "good-2": honest, "good-3": honest,
        "nan": lambda t: (with_first(t, lambda v: v.clone().index_fill_(0, torch.tensor([0]), float("nan"))), 100),
        "short": lambda t: (with_first(t, lambda v: v[:-1].clone()), 100),
        "huge": lambda t: (with_first(t, lambda v: v * 1e6), 100),
        "loud": lambda t: ({k: v + 0.2 if v.is_floating_point() else v for k, v in t.items()}, 100),
        "liar": lambda t: (nudged(t), 10**12),
        "no-arrays": lambda t: (None, 100),
    })
    assert metrics["participants"] == 3 and {name for name, _ in stats.participants.values()} == {"good-1", "good-2", "good-3"}
    assert set(stats.rejected) == {"nan", "short", "huge", "loud", "liar", "no-arrays"}
    assert "not finite" in stats.rejected["nan"] and "sent" in stats.rejected["short"]
    assert "the norm of the weights it moves" in stats.rejected["huge"] and "num-examples" in stats.rejected["liar"]
    assert "median" in stats.rejected["loud"]  # 20× the others' update: within the bound against the model
    assert "malformed reply" in stats.rejected["no-arrays"]
    # and by kind, as the coordinator's metrics count them
    assert stats.refused == {"implausible": 2, "tensors": 1, "examples": 1, "outlier": 1, "malformed": 1}
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(after[k], before[k]) for k in before) and stats.withheld is None


def poisoned(factor: float, var: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
             mean: Callable[[torch.Tensor], torch.Tensor] = lambda m: m) -> Reply:
    """A reply of the honest update times ``factor`` on the learned tensors, its BN statistics changed by ``var``
    and ``mean``: finite, well formed, one device's worth."""
    def reply(sent: dict) -> tuple[dict, object]:
        change = {"running_var": var, "running_mean": mean}
        return {key: change[key.rpartition(".")[2]](value) if key.endswith(STATISTICS)
                else sent[key] + factor * (value - sent[key]) if value.is_floating_point() else value
                for key, value in nudged(sent).items()}, 100
    return reply


POISONS: dict[str, tuple[Reply, str]] = {  # kind: (reply, why it is refused)
    "×1000": (poisoned(1000), "the norm of the weights it moves"),
    "×10, running_var ×1e6": (poisoned(10, var=lambda v: v * 1e6), "variance"),
    "negative running_var": (poisoned(1, var=lambda v: -v), "negative variance"),
    "huge running_mean": (poisoned(1, mean=lambda m: m + 1e6), "mean"),
    "sign flip ×100": (poisoned(-100), "the norm of the weights it moves"),
}


@pytest.mark.parametrize("honest_replies", [0, 1, 3])
@pytest.mark.parametrize("kind", POISONS)
def test_a_poisoned_reply_is_refused_however_few_replies_the_round_has(
    sqlite_url: str, calibration: list, message_identity: None, kind: str, honest_replies: int
) -> None:
    """Alone, beside one honest reply (no median to judge by) or beside three: judged against what it was sent."""
    reply, reason = POISONS[kind]
    stats, before, after, metrics = run_round(
        sqlite_url, calibration, {**{f"honest-{i}": honest for i in range(honest_replies)}, "poisoned": reply})
    assert set(stats.rejected) == {"poisoned"} and reason in stats.rejected["poisoned"], stats.rejected
    assert metrics["participants"] == honest_replies and stats.withheld is None
    assert implausible(before, after) is None


@pytest.mark.parametrize("kind", ["×1000", "sign flip ×100"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "dress"])
def test_a_peers_poisoned_reply_is_refused_like_dresss(sqlite_url: str, calibration: list, message_identity: None,
                                                      method: str, kind: str) -> None:
    """A peer's replies carry no BN statistics (the server recomputes them): its weights are judged the same way."""
    reply, reason = POISONS[kind]
    stats, _, _, metrics = run_round(sqlite_url, calibration, {"honest": honest, "poisoned": reply}, method=method,
                                     tiers={"honest": 1.0, "poisoned": 1.0})
    assert set(stats.rejected) == {"poisoned"} and reason in stats.rejected["poisoned"], stats.rejected
    assert metrics["participants"] == 1


@pytest.mark.parametrize("method", METHODS)
def test_honest_devices_count_at_every_density_whatever_the_method(sqlite_url: str, calibration: list,
                                                                   message_identity: None, method: str) -> None:
    """Real devices (the fleet's ClientApp) at every tier in round 1, from the initial model, at ten times the
    default learning rate: where honest updates are largest."""
    tiers = {f"tier-{t:g}": t for t in (0.1, 0.25, 0.5, 1.0)}
    stats, before, after, metrics = run_round(sqlite_url, calibration, dict.fromkeys(tiers), method=method,
                                              tiers=tiers)
    assert stats.rejected == {} and stats.withheld is None
    assert metrics["participants"] == (1 if method == "fedavg-capable" else 4)  # it trains the densest tier alone
    assert any(not torch.equal(after[k], before[k]) for k in before)


class Amplifying(DressStrategy):
    """Moves the model ``amplify`` times as far as its replies say: what replies that each passed their checks
    could add up to (colluding devices, or FedAvgM's velocity)."""

    amplify = 1000.0

    @torch.no_grad()
    def absorb(self, updates: list[Update]) -> None:
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        super().absorb(updates)
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                value.copy_(before[key] + self.amplify * (value - before[key]))


@pytest.mark.parametrize(("amplify", "reason"), [(1000.0, "implausible"), (float("inf"), "not finite")])
def test_a_round_whose_aggregate_is_implausible_is_rolled_back(sqlite_url: str, calibration: list,
                                                               message_identity: None, amplify: float,
                                                               reason: str) -> None:
    """Each reply passes its checks, together they make a bad model: the next round starts from the last one."""
    strategy_type = type("Amplified", (Amplifying,), {"amplify": amplify})
    stats, before, after, _ = run_round(sqlite_url, calibration, {f"d{i}": honest for i in range(3)},
                                        strategy_type=strategy_type)
    assert stats.withheld and "rolled back" in stats.withheld and reason in stats.withheld, stats.withheld
    assert stats.rejected == {}
    assert all(torch.equal(after[k], before[k]) for k in before)  # the arrays Flower hands the next round


# -- the publisher: a round nobody trained, implausible, or whose accuracy collapsed never reaches the fleet --


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
        stats = {r: RoundStats(r, participants={pi: ("pi", 0.1)}) for r in (1, 2, 3, 4, 6, 7)}
        stats[5] = RoundStats(5)  # every device dropped out or was rejected
        publisher = RoundPublisher(model, registry, test, tmp_path / "checkpoints", stats)
        publisher(1, ArrayRecord(torch_state_dict=good))
        assert registry.current_model_version() == "round-1" and stats[1].withheld is None
        poisoned = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in good.items()}
        publisher(2, ArrayRecord(torch_state_dict=poisoned))
        assert registry.current_model_version() == "round-1" and "not finite" in stats[2].withheld
        torch.manual_seed(1)
        other = build_run_model(RunSettings.defaults(width=4)).state_dict()  # another init: round 1's labels lost
        publisher(3, ArrayRecord(torch_state_dict=other))
        assert registry.current_model_version() == "round-1" and "accuracy collapsed" in stats[3].withheld
        publisher(4, ArrayRecord(torch_state_dict=good))
        assert registry.current_model_version() == "round-4"
        publisher(5, ArrayRecord(torch_state_dict=good))
        assert registry.current_model_version() == "round-4" and "no device" in stats[5].withheld
        scaled = {k: v * 1000 if v.is_floating_point() and not k.endswith(STATISTICS) else v for k, v in good.items()}
        publisher(6, ArrayRecord(torch_state_dict=scaled))  # the aggregate of a reply ×1000
        assert registry.current_model_version() == "round-4" and "norm of the weights" in stats[6].withheld
        wild = {k: v * 1e6 if k.endswith("running_var") else v for k, v in good.items()}
        publisher(7, ArrayRecord(torch_state_dict=wild))
        assert registry.current_model_version() == "round-4" and "variance" in stats[7].withheld
        withheld = {r.round: r.details["withheld"] for r in registry.list_rounds()}
    assert withheld[1] is None and withheld[4] is None and all(withheld[r] for r in (2, 3, 5, 6, 7))


def test_each_round_sends_its_own_learning_rate_and_anchor_weight(sqlite_url: str, calibration: list,
                                                                  message_identity: None) -> None:
    settings = RunSettings.defaults(width=4, num_rounds=10, joint="all", distill=0.5, distill_decay=0.0)
    model = build_run_model(settings)
    with Registry(sqlite_url) as registry:
        registry.register_device("pi", "pi4", calibration)
        [info] = registry.list_devices()
        strategy = DressStrategy(model, registry, None, fraction=1.0, min_devices=1, seed=0,  # type: ignore[arg-type]
                                 heartbeat_s=5.0, max_examples=300,
                                 round_config=lambda r: {"lr": settings.lr_at(r), "distill": settings.distill_at(r)})
        for round_number in (1, 10):
            strategy.stats[round_number] = RoundStats(round_number)
            [message] = strategy.messages_for(round_number, [(100, info, 0.1)], train_config(settings))
            config = message.content["config"]
            assert config["lr"] == pytest.approx(settings.lr_at(round_number))
            assert config["distill"] == pytest.approx(settings.distill_at(round_number))
    assert settings.distill_at(10) == 0.0 < settings.distill_at(1)
