"""Poisoned replies through the real aggregation path: every kind of bad reply a device can send (malformed, or
well-formed but no honest training makes it) goes through ``DressStrategy`` in rounds of 1, 2 and 3+ replies. None
may be aggregated, nothing may crash, and the honest replies beside them must still train a plausible model. Part of
benchmarks/reliability.py.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.strangers import CALIBRATION
from contracts.messages import train_config
from contracts.settings import RunSettings, build_run_model
from coordinator.fleet_strategy import RoundStats
from coordinator.registry import Registry
from coordinator.strategy import DressStrategy
from coordinator.validation import STATISTICS, implausible
from runtime.task_identity import task_identity

Tensors = dict[str, torch.Tensor]
Reply = Callable[[Tensors, Tensors], tuple[Tensors | None, object]]  # (sent, honest reply) -> what a device replies
REPLY_COUNTS = {"1": 0, "2": 1, "3+": 3}  # a round's replies: how many honest ones beside the poisoned one


def _scaled(factor: float, var: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
            mean: Callable[[torch.Tensor], torch.Tensor] = lambda m: m) -> Reply:
    """The honest update times ``factor`` on the learned tensors, then BN statistics changed by ``var``, ``mean``."""
    def reply(sent: Tensors, honest: Tensors) -> tuple[Tensors, object]:
        change = {"running_var": var, "running_mean": mean}
        return {k: change[k.rpartition(".")[2]](v) if k.endswith(STATISTICS)
                else sent[k] + factor * (v - sent[k]) if v.is_floating_point() else v
                for k, v in honest.items()}, 100
    return reply


def _poisons() -> dict[str, Reply]:
    """Every kind of bad reply a device can send: (tensors or None for no arrays, num-examples). Malformed ones,
    and well-formed ones no honest training makes: scaled, reversed, BN statistics out of range."""
    def first(t: dict) -> str:
        return next(k for k in t if k.endswith(".values"))

    def changed(change: Callable[[torch.Tensor], torch.Tensor]) -> Reply:
        return lambda _, t: ({**t, first(t): change(t[first(t)].clone())}, 100)

    return {
        "nan": changed(lambda v: v.index_fill_(0, torch.tensor([0]), float("nan"))),
        "inf": changed(lambda v: v.index_fill_(0, torch.tensor([0]), float("inf"))),
        "huge": changed(lambda v: v * 1e30),
        "short": changed(lambda v: v[:-1]),
        "long": changed(lambda v: torch.cat([v, v[:1]])),
        "float64": changed(lambda v: v.double()),
        "reshaped": changed(lambda v: v.reshape(1, -1)),
        "missing tensor": lambda _, t: ({k: v for k, v in t.items() if k != first(t)}, 100),
        "extra tensor": lambda _, t: ({**t, "evil": torch.zeros(3)}, 100),
        "no arrays": lambda _, t: (None, 100),
        "examples 1e12": lambda _, t: (t, 10**12),
        "examples 0": lambda _, t: (t, 0),
        "examples -1": lambda _, t: (t, -1),
        "examples nan": lambda _, t: (t, float("nan")),
        "examples missing": lambda _, t: (t, None),
        "update ×1000": _scaled(1000),
        "update ×10, running_var ×1e6": _scaled(10, var=lambda v: v * 1e6),
        "negative running_var": _scaled(1, var=lambda v: -v),
        "running_mean +1e6": _scaled(1, mean=lambda m: m + 1e6),
        "update reversed ×100": _scaled(-100),
    }


def _through_strategy(rounds: list[dict[str, str | None]], seed: int) -> Counter[str]:
    """Each round's devices (name: kind of poison, None for an honest one) reply through the real strategy, at the
    sparsest tier: how many poisoned and honest replies it aggregated, rounds rolled back, crashes (an exception
    out of the aggregation, a model not finite), rounds whose model was implausible against the last. An honest
    reply moves every value it was sent by 0.01, up in odd rounds and down in even ones: the model keeps its size,
    as weight decay keeps a trained one's, so an update is judged against a model of the same size all along."""
    torch.manual_seed(seed)
    kinds = _poisons()
    counts: Counter[str] = Counter()
    with task_identity(), tempfile.TemporaryDirectory() as tmp, \
            Registry(f"sqlite:///{tmp}/registry.sqlite3") as registry:  # a ServerApp's message identity
        model = build_run_model(RunSettings.defaults(width=4))
        data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
        strategy = DressStrategy(model, registry, torch.utils.data.DataLoader(data, batch_size=16), fraction=1.0,
                                 min_devices=1, seed=seed, heartbeat_s=5.0, max_examples=300)
        for round_number, devices in enumerate(rounds, 1):
            for name in devices:
                registry.register_device(name, "pi4", CALIBRATION)
            infos = {d.name: d for d in registry.list_devices()}
            strategy.stats[round_number] = RoundStats(round_number)
            nodes = {1000 * round_number + j: name for j, name in enumerate(devices)}
            strategy.membership.node_devices.update(nodes)
            sent = strategy.messages_for(round_number, [(node, infos[name], 0.1) for node, name in nodes.items()],
                                         train_config(RunSettings.defaults()))
            replies = []
            step = 0.01 if round_number % 2 else -0.01
            for message in sent:
                node = message.metadata.dst_node_id
                expected = strategy.sent[node].expected.tensors
                honest = {k: v + step if v.is_floating_point() else v for k, v in expected.items()}
                kind = devices[nodes[node]]
                tensors, examples = (honest, 100) if kind is None else kinds[kind](expected, honest)
                metrics: dict[str, Any] = {"compute-s": 0.1}
                if examples is not None:
                    metrics["num-examples"] = examples
                content: dict[str, Any] = {"metrics": MetricRecord(metrics)}
                if tensors is not None:
                    content["arrays"] = ArrayRecord(torch_state_dict=tensors)
                TaskIdentity.node_id = node
                replies.append(Message(RecordDict(content), reply_to=message))
            TaskIdentity.node_id = 1
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                strategy.aggregate_train(round_number, replies)
            except Exception:  # noqa: BLE001 - the ServerApp would have ended
                counts["crashes"] += 1
            stats = strategy.stats[round_number]
            for name, _ in stats.participants.values():
                counts["honest" if devices[name] is None else "aggregated"] += 1
            counts["rolled back"] += stats.withheld is not None
            if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
                counts["crashes"] += 1
            counts["implausible"] += implausible(before, model.state_dict()) is not None
    return counts


def _kinds(count: int) -> list[str]:
    """``count`` kinds of poison, every kind in turn."""
    kinds = list(_poisons())
    return [kinds[i % len(kinds)] for i in range(count)]


def poisoned(count: int, seed: int) -> dict[str, Any]:
    """``count`` poisoned replies (every kind in turn), five with three honest ones a round, through the real
    strategy."""
    names = _kinds(count)
    rounds = [{f"honest-{j}": None for j in range(3)} | {f"poisoned-{i + k}": n for k, n in enumerate(names[i:i + 5])}
              for i in range(0, count, 5)]
    counts = _through_strategy(rounds, seed)
    return {"tried": count, "aggregated": counts["aggregated"], "crashes": counts["crashes"],
            "kinds": sorted(_poisons())}


def poisoned_by_replies(count: int, seed: int) -> dict[str, Any]:
    """``count`` poisoned replies (every kind in turn) in rounds of each size, one poisoned reply a round: alone,
    beside one honest reply (too few for a median) and beside three; and whether training went on — the honest
    replies aggregated, every round's model finite with BN statistics in range (plausible against the last)."""
    result: dict[str, Any] = {}
    plausible = True
    for size, honest in REPLY_COUNTS.items():
        rounds = [{f"honest-{j}": None for j in range(honest)} | {f"poisoned-{i}": kind}
                  for i, kind in enumerate(_kinds(count))]
        counts = _through_strategy(rounds, seed)
        result[size] = {"tried": count, "aggregated": counts["aggregated"], "honest_tried": honest * count,
                        "honest_aggregated": counts["honest"], "rolled_back": counts["rolled back"],
                        "crashes": counts["crashes"]}
        plausible = plausible and not counts["implausible"] and not counts["crashes"]
    return {**result, "model_plausible": plausible}
