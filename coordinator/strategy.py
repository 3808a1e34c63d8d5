"""The DRESS strategy: each sampled device trains the subnet its current budget allows.

Flower's FedAvg rejects replies of different shapes, so this is a Strategy of its own. Each round it learns
which device each Flower node is (a ``query.status`` message: node-config never reaches the SuperLink), asks
the registry for every device's current density, sends each sampled device its packed subnet, then
aggregates every weight over the devices that trained it, re-ranks the rows, recalibrates per-density BN on
server-held data, evaluates every density, records the round in the registry and checkpoints the model.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch.utils.data import DataLoader

from coordinator.aggregation import Update, aggregate
from coordinator.registry.models import DeviceStatus
from coordinator.registry.repository import Registry
from dress_model.checkpoint import save_checkpoint
from dress_model.models import DressModel
from dress_model.packed import PackedModel
from dress_model.training import evaluate, recalibrate_bn
from protos.flower_messages import record_nbytes, subnet_record

log = logging.getLogger(__name__)


@dataclass
class RoundSettings:
    """What every device is told to do, and how the server samples and checks."""

    fraction: float = 0.1
    min_devices: int = 1
    epochs: float = 1.0
    lr: float = 0.05
    batch_size: int = 32
    dataset: str = "fashion-mnist"
    partition: str = "iid"
    seed: int = 0
    max_examples: int = 0  # per device per round; 0 = the whole shard
    calibration_batches: int = 8
    stale_after_s: float = 30.0  # a device silent this long is offline and not sampled
    checkpoint_dir: Path = Path("state/checkpoints")


@dataclass
class RoundLog:
    """Per-round facts the simulation report and the fleet benchmark read."""

    round: int
    participants: dict[str, float]
    accuracy: dict[float, float]
    bytes_down: dict[float, list[int]] = field(default_factory=dict)
    bytes_up: dict[float, list[int]] = field(default_factory=dict)
    compute_s: float = 0.0  # slowest device's train time (unpack, train, pack)
    device_compute_s: float = 0.0  # all devices' train time added up
    server_s: float = 0.0  # aggregation, re-ranking, BN recalibration, evaluation, checkpoint
    wall_s: float = 0.0


class DressStrategy(Strategy):
    def __init__(
        self,
        model: DressModel,
        registry: Registry,
        settings: RoundSettings,
        calibration: DataLoader,
        test: DataLoader,
        on_round: Callable[[RoundLog], None] | None = None,
    ) -> None:
        self.model = model
        self.registry = registry
        self.settings = settings
        self.calibration = calibration
        self.test = test
        self.on_round = on_round
        self.node_devices: dict[int, str] = {}
        self.sent: dict[int, tuple[int, PackedModel]] = {}  # node id -> (device id, subnet it was sent)
        self.history: list[RoundLog] = []
        self._round_started = 0.0
        self._bytes_down: dict[float, list[int]] = {}

    def summary(self) -> None:
        log.info("DRESS strategy: densities %s, %s", self.model.densities, self.settings)

    # -- which device is which node ------------------------------------------------------------------

    def identify(self, grid: Grid, node_ids: Iterable[int]) -> None:
        unknown = [n for n in node_ids if n not in self.node_devices]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type="query.status") for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=120):
            if reply.has_error():
                log.warning("node %s did not answer the status query: %s", reply.metadata.src_node_id, reply.error)
                continue
            status = reply.content["status"]
            self.node_devices[reply.metadata.src_node_id] = str(status["device"])

    # -- train -------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self.identify(grid, grid.get_node_ids())
        self.registry.mark_offline(timedelta(seconds=self.settings.stale_after_s))
        devices = {d.name: d for d in self.registry.list_devices()}
        candidates = []
        for node, name in sorted(self.node_devices.items()):
            info = devices.get(name)
            if info is None or info.status != DeviceStatus.ONLINE:
                continue
            if not any(math.isclose(info.current_density, d) for d in self.model.densities):
                log.warning("device %s runs density %g, which this model lacks", name, info.current_density)
                continue
            candidates.append((node, info))
        s = self.settings
        count = min(len(candidates), max(s.min_devices, math.ceil(s.fraction * len(candidates))))
        chosen = random.Random(s.seed * 100_003 + server_round).sample(candidates, count)
        log.info("round %d: %d of %d online devices", server_round, len(chosen), len(candidates))

        subnets: dict[float, tuple[PackedModel, ArrayRecord]] = {}
        self.sent, self._bytes_down = {}, {}
        messages = []
        for node, info in chosen:
            density = self.model.densities[self.model.density_index(info.current_density)]
            if density not in subnets:
                packed = PackedModel.from_dress(self.model, max_density=density)
                subnets[density] = (packed, subnet_record(packed))
            packed, record = subnets[density]
            self.sent[node] = (info.id, packed)
            self._bytes_down.setdefault(density, []).append(record_nbytes(record))
            train_config = ConfigRecord(
                {
                    "server-round": server_round,
                    "epochs": s.epochs,
                    "lr": s.lr,
                    "batch-size": s.batch_size,
                    "dataset": s.dataset,
                    "partition": s.partition,
                    "seed": s.seed,
                    "max-examples": s.max_examples,
                }
            )
            content = RecordDict({"arrays": record, "config": train_config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_start = time.perf_counter()
        updates, participants, bytes_up, compute = [], {}, {}, []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in self.sent:
                log.warning("round %d: node %s dropped out (%s)", server_round, node, reply.error if reply.has_error() else "unexpected")
                continue
            device_id, sent = self.sent[node]
            arrays: ArrayRecord = reply.content["arrays"]
            metrics: MetricRecord = reply.content["metrics"]
            tensors = arrays.to_torch_state_dict()
            updates.append(Update(sent, tensors, int(metrics["num-examples"])))
            density = sent.densities[-1]
            participants[device_id] = density
            bytes_up.setdefault(density, []).append(record_nbytes(arrays))
            compute.append(float(metrics["compute-s"]))
        aggregate(self.model, updates)
        self.model.rerank()
        recalibrate_bn(self.model, self.calibration, self.settings.calibration_batches, self.model.densities)
        accuracy = evaluate(self.model, self.test)
        version = f"round-{server_round}"
        path = save_checkpoint(
            self.model, self.settings.checkpoint_dir / f"{version}.safetensors", {"round": server_round}
        )
        self.registry.add_model_version(version, str(path), self.model.densities)
        self.registry.record_round(
            server_round,
            participants,
            {d: {"accuracy": a} for d, a in accuracy.items()},
            bytes_sent=sum(sum(v) for v in self._bytes_down.values()),
            bytes_received=sum(sum(v) for v in bytes_up.values()),
            model_version=version,
        )
        names = {device_id: self.node_devices[node] for node, (device_id, _) in self.sent.items()}
        entry = RoundLog(
            round=server_round,
            participants={names[i]: d for i, d in participants.items()},
            accuracy=accuracy,
            bytes_down=self._bytes_down,
            bytes_up=bytes_up,
            compute_s=max(compute, default=0.0),
            device_compute_s=sum(compute),
            server_s=time.perf_counter() - server_start,
            wall_s=time.perf_counter() - self._round_started,
        )
        self.history.append(entry)
        if self.on_round:
            self.on_round(entry)
        metrics = {f"accuracy-{d:g}": a for d, a in accuracy.items()}
        metrics["participants"] = len(participants)
        return None, MetricRecord(metrics)

    # -- evaluation happens on the server, every density, every round ---------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
