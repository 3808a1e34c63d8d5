"""The round plumbing every method's strategy shares: sample the round's devices, send each its density's model
with the round's training config, check every reply, fold the accepted ones into the global model, step the
server's momentum and average, distil the round's devices into the global model on server-held images (when
asked), recalibrate BN on server-held data, roll back an implausible aggregate.

Flower's FedAvg rejects replies of different shapes, so this is a Strategy of its own. The global model travels
between Flower's rounds as the strategy's ``ArrayRecord``. Each round it asks the registry for every device's
current density and which devices are online; which node is which device is ``coordinator.membership``'s
business. What a method's densities are, what travels and how replies are folded in are its hooks: DRESS
(``coordinator.strategy``) and the width-nested peers (``coordinator.peers``) are siblings over this base.
Evaluation, checkpoints and publishing happen in Flower's evaluation hook (``coordinator.publisher``).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch.utils.data import DataLoader

from contracts.messages import record_nbytes, train_message
from contracts.policy import training_density
from contracts.settings import MEAN, Aggregation, stale_after
from coordinator.aggregation import Update
from coordinator.ensemble_distillation import Teacher, distill, ensemble_predictions
from coordinator.membership import Membership
from coordinator.registry.models import DeviceStatus
from coordinator.registry.records import DeviceInfo
from coordinator.registry.repository import Registry
from coordinator.validation import Expected, RejectedUpdate, check_reply, implausible, size_outliers
from dress_model.models import DressModel
from dress_model.training import PLAIN, LogitView, recalibrate_bn

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 8  # server-held batches that recompute each density's BN statistics after aggregation


@dataclass
class RoundStats:
    """What happened in one round besides the model: who trained what, bytes, time. The publisher records it."""

    round: int
    participants: dict[int, tuple[str, float]] = field(default_factory=dict)  # device id -> (name, density)
    bytes_down: dict[float, list[int]] = field(default_factory=dict)
    bytes_up: dict[float, list[int]] = field(default_factory=dict)
    compute_s: list[float] = field(default_factory=list)  # per device: unpack, train, pack
    macs: list[float] = field(default_factory=list)  # per device: the MACs its training ran (its count)
    started: float = field(default_factory=time.perf_counter)
    server_s: float = 0.0  # aggregation, distillation, re-ranking, BN recalibration (the publisher adds its share)
    lr: float | None = None  # the learning rate the round's devices were sent
    rejected: dict[str, str] = field(default_factory=dict)  # device name -> why its reply did not count
    refused: Counter[str] = field(default_factory=Counter)  # how many replies did not count, by kind (REFUSALS)
    withheld: str | None = None  # why the round's model was not published (the publisher), if it was not
    final_accuracy: dict[float, float] | None = None  # the run's last round: its model on the whole split
    final_counts: dict[float, tuple[list[int], list[int]]] | None = None  # and per class: (correct, seen)


@dataclass(frozen=True)
class Sent:
    """What one device was sent in a round, and so what its reply must look like."""

    device_id: int
    density: float
    payload: object  # DRESS: the PackedModel (its indices place the reply); a peer: its density's slices
    expected: Expected


def reported(metrics: MetricRecord, key: str) -> float:
    """A cost a device reports about itself (seconds, MACs): only recorded, never acted on; absent or not a
    finite number >= 0, it reads 0."""
    value = float(metrics[key]) if key in metrics else 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


class FleetStrategy(Strategy):
    """The round plumbing every method shares; a method says what its densities are, what travels and how replies
    fold into its model (the hooks below)."""

    def __init__(
        self,
        model: DressModel,
        registry: Registry,
        calibration: DataLoader,
        *,
        fraction: float,
        min_devices: int,
        seed: int,
        heartbeat_s: float,
        max_examples: int,
        round_config: Callable[[int], dict[str, float]] | None = None,
        server_momentum: float = 0.0,
        node_auth: bool = False,
        first_round: int = 1,
        aggregation: Aggregation = MEAN,
        round_timeout_s: float | None = None,
        server_average: float = 0.0,
        damped: bool = True,
        server_distill: int = 0,
    ) -> None:
        self.model = model  # the working copy the global arrays are loaded into each round
        self.registry = registry
        self.calibration = calibration
        self.fraction, self.min_devices, self.seed = fraction, min_devices, seed
        self.heartbeat_s = heartbeat_s  # the setting; a device silent for several of its fleet's periods is offline
        self.round_config = round_config  # what changes per round (lr, anchor weight); None = the train config's
        self.offset = first_round - 1  # Flower counts this run's rounds from 1; a resumed run continues the count
        self.server_momentum = server_momentum
        self.aggregation = aggregation
        self.velocity: dict[str, torch.Tensor] = {}  # per parameter: the server's momentum (server_step)
        self.server_average = server_average
        self.damped = damped  # aggregation: by the trainers' share of the round's examples, or all the way
        self.server_distill = server_distill  # steps of ensemble distillation a round (0 = none)
        self.average: DressModel | None = None  # what is published when server_average > 0 (update_average)
        self.membership = Membership(registry, node_auth)
        self.max_examples = max_examples  # the most examples a reply may claim to have trained on
        self.round_timeout_s = round_timeout_s  # a device's training must fit it; its messages live that long
        self.train_steps: int | None = None  # the most steps a device takes this round (configure_train)
        self.sent: dict[int, Sent] = {}  # node id -> what its device was sent this round
        self.stats: dict[int, RoundStats] = {}

    def summary(self) -> None:
        log.info("%s: densities %s, fraction %g, min devices %d", type(self).__name__, self.model.densities,
                 self.fraction, self.min_devices)

    # -- train -------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        self.stats[server_round] = RoundStats(server_round)
        self.model.load_state_dict(arrays.to_torch_state_dict())
        self.train_steps = math.ceil(float(config["epochs"]) * self.max_examples / int(config["batch-size"]))
        self.registry.mark_offline(stale_after(self.heartbeat_s, self.registry.count_devices()))
        devices = {d.name: d for d in self.registry.list_devices()}
        online = sum(1 for d in devices.values() if d.status == DeviceStatus.ONLINE)
        count = min(online, max(self.min_devices, math.ceil(self.fraction * online)))
        chosen = self.membership.sample(grid, devices, count, random.Random(self.seed * 100_003 + server_round),
                                        self.training_density)
        log.info("round %d: %d of %d drawn online devices train", server_round, len(chosen), count)
        self.registry.start_round(server_round, {info.name: density for _, info, density in chosen},
                                  self.round_timeout_s)
        return self.messages_for(server_round, chosen, config)

    def messages_for(self, server_round: int, chosen: list[tuple[int, DeviceInfo, float]],
                     config: ConfigRecord) -> list[Message]:
        """One train message per chosen (node, device, density), and what each device's reply must look like."""
        stats = self.stats[server_round]
        if self.round_config is not None:
            config = ConfigRecord({**config, **self.round_config(server_round)})
        stats.lr = float(config["lr"])
        payloads: dict[float, tuple[object, ArrayRecord, Expected]] = {}
        self.sent = {}
        messages = []
        for node, info, density in chosen:
            if density not in payloads:
                sent, record = self.payload(density)
                payloads[density] = sent, record, Expected(self.reply_template(sent, record), self.max_examples)
            sent, record, expected = payloads[density]
            self.sent[node] = Sent(info.id, density, sent, expected)
            stats.bytes_down.setdefault(density, []).append(record_nbytes(record))
            messages.append(train_message(node, record, config, server_round, self.model.densities.index(density),
                                          ttl=self.round_timeout_s))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        server_start = time.perf_counter()
        stats = self.stats[server_round]
        accepted: dict[int, tuple[Update, int, float, float]] = {}  # node -> (update, bytes up, compute s, MACs)
        sizes: dict[int, float] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in self.sent:
                log.warning("round %d: node %s dropped out (%s)", server_round, node,
                            reply.error if reply.has_error() else "unexpected")
                continue
            sent = self.sent[node]
            try:  # everything in a reply is the device's say: checked, and no error in it may end the ServerApp
                arrays: ArrayRecord = reply.content["arrays"]
                metrics: MetricRecord = reply.content["metrics"]
                tensors = arrays.to_torch_state_dict()
                sizes[node] = check_reply(sent.expected, tensors, metrics["num-examples"])
                compute_s, macs = (reported(metrics, key) for key in ("compute-s", "macs"))
                update = self.update_of(sent, tensors, metrics)
            except Exception as e:  # noqa: BLE001 - a malformed reply is dropped whatever broke reading it
                self._reject(server_round, node, e if isinstance(e, RejectedUpdate)
                             else RejectedUpdate(f"malformed reply: {e!r}", "malformed"))
                continue
            accepted[node] = (update, record_nbytes(arrays), compute_s, macs)
        for node, reason in size_outliers(sizes).items():
            self._reject(server_round, node, RejectedUpdate(reason, "outlier"))
            accepted.pop(node, None)
        updates, trained = [], []
        for node, (update, nbytes, compute_s, macs) in accepted.items():
            sent = self.sent[node]
            updates.append(update)
            trained.append((update, sent.density))
            stats.participants[sent.device_id] = (self.membership.node_devices[node], sent.density)
            stats.bytes_up.setdefault(sent.density, []).append(nbytes)
            stats.compute_s.append(compute_s)
            stats.macs.append(macs)
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.absorb(updates)
        if updates:
            self.server_step(before)
        if self.server_distill and any(u.num_examples > 0 for u in updates):
            self.distill_devices(before, trained, server_round)
        self.reorder()
        recalibrate_bn(self.model, self.calibration, CALIBRATION_BATCHES, self.model.densities)
        if reason := implausible(before, self.model.state_dict()):
            self.model.load_state_dict(before)  # checked replies can still add up to a bad model: keep the last one
            self.velocity = {}
            stats.withheld = f"the aggregate was implausible ({reason}); the round was rolled back"
            log.warning("round %d: %s", server_round, stats.withheld)
        self.update_average()
        stats.server_s = time.perf_counter() - server_start
        examples = sum(u.num_examples for u in updates)
        return (ArrayRecord(torch_state_dict=self.model.state_dict()),
                MetricRecord({"participants": len(updates), "num-examples": examples}))

    def _reject(self, server_round: int, node: int, reason: RejectedUpdate) -> None:
        name = self.membership.name_of(node)
        self.stats[server_round].rejected[name] = str(reason)
        self.stats[server_round].refused[reason.kind] += 1
        log.warning("round %d: the reply of %s does not count: %s", server_round, name, reason)

    def training_density(self, info: DeviceInfo) -> float | None:
        """What the device trains this round: the densest density at or below its assignment whose training
        fits it — its calibrated step's memory within its last budget, the round's steps within the round's
        timeout — as this method's model has it; None leaves it out of the round. A device that measured no
        training cost trains at its assignment."""
        allowed: float | None = info.current_density
        if info.calibration:
            memory = info.last_budget.memory_mb if info.last_budget is not None else None
            allowed = training_density(info.calibration, info.current_density, memory, self.train_steps,
                                       self.round_timeout_s or math.inf)
        return None if allowed is None else self.density_for(allowed)

    # -- what each method says (DressStrategy, coordinator.peers.WidthStrategy) -----------------------

    def density_for(self, allowed: float) -> float | None:
        """The density of this method's model a device whose budget allows ``allowed`` trains; None leaves it
        out of the round."""
        raise NotImplementedError

    def payload(self, density: float) -> tuple[object, ArrayRecord]:
        """What a device training ``density`` is sent: what to read its reply by, and the record."""
        raise NotImplementedError

    def reply_template(self, sent: object, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """The tensors a device's reply must hold (names, shapes, dtypes)."""
        raise NotImplementedError

    def update_of(self, sent: Sent, tensors: dict[str, torch.Tensor], metrics: MetricRecord) -> Update:
        """A checked reply as an update to aggregate."""
        return Update(sent.payload, tensors, int(metrics["num-examples"]))

    def absorb(self, updates: list[Update], model: DressModel | None = None, damped: bool | None = None) -> None:
        """Fold the round's replies into the global model (or into ``model``; ``damped`` None: the setting's)."""
        raise NotImplementedError

    def teacher_view(self, update: Update) -> LogitView:
        """What a device's model says as a teacher: its logits as its loss saw them (HeteroFL: its labels')."""
        return PLAIN

    def reorder(self, model: DressModel | None = None) -> None:
        """After the weights moved: whatever the method's model needs (DRESS re-ranks its rows)."""

    # -- the server's own step, the same for every method ---------------------------------------------

    def distill_devices(self, before: dict[str, torch.Tensor], trained: list[tuple[Update, float]],
                        server_round: int) -> None:
        """Ensemble distillation (``coordinator.ensemble_distillation``): each device's model as it replied — its
        reply folded all the way into the round's starting model, BN recalibrated at its density on the held
        images — and together, weighted by examples, they teach every density of the global model there."""
        start = copy.deepcopy(self.model)
        start.load_state_dict(before)
        teachers = []
        for update, density in trained:
            if update.num_examples <= 0:
                continue
            device = copy.deepcopy(start)
            self.absorb([update], model=device, damped=False)
            recalibrate_bn(device, self.calibration, CALIBRATION_BATCHES, [density])
            teachers.append(Teacher(device, density, float(update.num_examples), self.teacher_view(update)))
        images = torch.cat([x for x, _ in self.calibration])
        targets = ensemble_predictions(teachers, images)
        lr = self.stats[server_round].lr
        assert lr is not None, "the round's rate is set with its messages (messages_for)"
        losses = distill(self.model, targets, images, self.server_distill, lr, self.seed * 100_003 + server_round)
        log.info("round %d: %d devices distilled into every density, KL %.3f -> %.3f", server_round, len(teachers),
                 losses[0], losses[-1])

    @torch.no_grad()
    def server_step(self, before: dict[str, torch.Tensor]) -> None:
        """FedAvgM: step along a momentum of the rounds' aggregated updates instead of the last one alone.

        A round's average of ten devices' few local steps is one small, low-noise step; with momentum ``m``
        the server keeps going in the direction the rounds agree on, about 1/(1-m) times as far (Hsu et al.
        2019). Parameters only: BN statistics are recomputed on server data after every round. The velocity
        lives in this process; a restarted coordinator starts it from zero."""
        if not self.server_momentum:
            return
        for name, param in self.model.named_parameters():
            delta = param - before[name]
            velocity = self.velocity.get(name)
            velocity = delta if velocity is None else velocity.mul_(self.server_momentum).add_(delta)
            self.velocity[name] = velocity
            param.copy_(before[name] + velocity)

    @torch.no_grad()
    def update_average(self) -> None:
        """The published model: an exponential average of the rounds' global models (Polyak averaging).

        A weight in a band above the sparsest moves each round by the two or three capable devices that
        trained it, each pulling it towards its own data; averaged over rounds it reflects many more of them
        (what it gained, and what was tried and dropped: docs/DECISIONS.md). Training continues from the
        round's own model; the average's rows are re-ranked and its BN recalibrated like the round's. A resumed
        run restarts both from the last published model."""
        if not self.server_average:
            return
        if self.average is None:
            self.average = copy.deepcopy(self.model)
            return
        for averaged, current in zip(self.average.parameters(), self.model.parameters(), strict=True):
            averaged.mul_(self.server_average).add_(current, alpha=1 - self.server_average)
        self.reorder(self.average)
        recalibrate_bn(self.average, self.calibration, CALIBRATION_BATCHES, self.average.densities)

    def published_state(self) -> dict[str, torch.Tensor] | None:
        """What the publisher evaluates and publishes instead of the round's model; None: the round's model."""
        return None if self.average is None else self.average.state_dict()

    # -- evaluation happens on the server (the publisher), every density, every round -------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
