"""The Flower ClientApp every device runs, in deployment (SuperNode) and simulation (Ray actor) alike.

A train message carries the device's subnet in the packed format (one uint8 array: the same bytes a device
stores and executes) and the training settings. The device jointly trains every density at or below its own
with the weighted loss on its local partition, keeping the masks it was sent, and replies with the trained
packed values (no indices: the server holds them).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dress_model.data import ImageDataset, load_dataset
from dress_model.packed import PackedModel
from dress_model.partition import parse_partition
from dress_model.training import TrainConfig, train
from protos.flower_messages import subnet_from_record, upload_record

log = logging.getLogger(__name__)
app = ClientApp()

def device_identity(context: Context) -> tuple[str, str]:
    """(device name, profile): from the SuperNode's node-config, or derived for simulated devices."""
    cfg = context.node_config
    if "device-id" in cfg:
        return str(cfg["device-id"]), str(cfg.get("profile", "unknown"))
    return f"sim-{int(cfg.get('partition-id', context.node_id)):03d}", str(cfg.get("profile", "simulated"))


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None) -> ImageDataset:
    return load_dataset(name, "train", data_dir or None)


@functools.lru_cache(maxsize=8)
def _partition(name: str, data_dir: str | None, spec: str, parts: int, seed: int) -> tuple[np.ndarray, ...]:
    data = _dataset(name, data_dir)
    return tuple(parse_partition(spec).split(data.labels.numpy(), parts, seed))


def local_data(context: Context, config: ConfigRecord) -> ImageDataset:
    """This device's shard: partition ``partition-id`` of ``num-partitions`` of the training split."""
    node = context.node_config
    part, parts = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    data_dir = str(node.get("data-dir", "")) or None
    name = str(config["dataset"])
    shard = _partition(name, data_dir, str(config["partition"]), parts, int(config["seed"]))[part]
    limit = int(config.get("max-examples", 0))
    if limit:
        shard = shard[:limit]
    return _dataset(name, data_dir).subset(shard)


@app.query("status")
def status(msg: Message, context: Context) -> Message:
    """Tells the server which device this Flower node is (node-config never reaches the SuperLink)."""
    name, profile = device_identity(context)
    return Message(RecordDict({"status": ConfigRecord({"device": name, "profile": profile})}), reply_to=msg)


@app.train()
def train_subnet(msg: Message, context: Context) -> Message:
    config: ConfigRecord = msg.content["config"]
    start = time.perf_counter()
    packed = subnet_from_record(msg.content["arrays"])
    model = packed.to_dress()
    data = local_data(context, config)
    torch.manual_seed(int(config["seed"]) + int(config["server-round"]) * 1000 + context.node_id % 1000)
    settings = TrainConfig(
        epochs=float(config["epochs"]),
        lr=float(config["lr"]),
        rerank_every=0,  # the device keeps the masks it was sent; the server re-ranks after aggregation
        recalibrate_batches=0,  # and recalibrates BN on its own data after aggregation
    )
    losses = train(model, data.loader(int(config["batch-size"]), shuffle=True, seed=int(config["seed"])), settings)
    compute_s = time.perf_counter() - start
    trained = PackedModel.from_dress(model.eval())
    arrays = upload_record(trained)
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "density": packed.densities[-1],
            "train-loss": float(losses.get(packed.densities[-1], 0.0)),
            "compute-s": compute_s,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
