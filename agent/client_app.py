"""The Flower ClientApp every device runs, in deployment (SuperNode) and simulation (Ray actor) alike.

A train message carries the device's subnet in the packed format (one uint8 array: the same bytes a device
stores and executes) and the round's training knobs; the data settings come from the run config. The device
jointly trains every density at or below its own with the weighted loss on its local partition, through the
packed format itself (no dense weight, mask or order is built: the subnets are prefixes of the same value
buffers, which the optimizer updates in place), and replies with the trained packed values (no indices: the
server holds them).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from contracts.messages import status_reply, subnet_from_record, train_reply, upload_record
from contracts.methods import Method, get_method
from contracts.naming import simulated_name
from contracts.settings import RunSettings, build_run_model
from dress_model.baselines.ordered_dropout import train_ordered_dropout
from dress_model.baselines.slimmable import load_prefixes, prefix_tensors
from dress_model.data import ImageDataset, load_dataset
from dress_model.models import DressModel
from dress_model.partition import parse_partition
from dress_model.training import TrainConfig, train

log = logging.getLogger(__name__)
app = ClientApp()

def device_identity(context: Context) -> tuple[str, str]:
    """(device name, profile): from the SuperNode's node-config, or derived for simulated devices."""
    cfg = context.node_config
    if "device-id" in cfg:
        return str(cfg["device-id"]), str(cfg.get("profile", "unknown"))
    return simulated_name(int(cfg.get("partition-id", context.node_id))), str(cfg.get("profile", "simulated"))


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None) -> ImageDataset:
    return load_dataset(name, "train", data_dir or None)


@functools.lru_cache(maxsize=8)
def _partition(name: str, data_dir: str | None, spec: str, parts: int, seed: int) -> tuple[np.ndarray, ...]:
    data = _dataset(name, data_dir)
    return tuple(parse_partition(spec).split(data.labels.numpy(), parts, seed))


def local_data(context: Context, settings: RunSettings, max_examples: int) -> ImageDataset:
    """This device's shard: partition ``partition-id`` of ``num-partitions`` of the training split.

    The device's own ``data-dir`` (node-config) wins over the run's: files sit where each host keeps them."""
    node = context.node_config
    part, parts = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    data_dir = str(node.get("data-dir", "")) or settings.data_dir or None
    shard = _partition(settings.dataset, data_dir, settings.partition, parts, settings.seed)[part]
    if max_examples:
        shard = shard[:max_examples]
    return _dataset(settings.dataset, data_dir).subset(shard)


@app.query("status")
def status(msg: Message, context: Context) -> Message:
    """Tells the server which device this Flower node is (node-config never reaches the SuperLink)."""
    return status_reply(msg, *device_identity(context))


def train_config_of(config: ConfigRecord) -> TrainConfig:
    return TrainConfig(
        epochs=float(config["epochs"]),
        lr=float(config["lr"]),
        distill=float(config["distill"]),
        rerank_every=0,  # the device keeps the masks it was sent; the server re-ranks after aggregation
        recalibrate_batches=0,  # and the server recalibrates BN after aggregation
    )


@app.train()
def train_subnet(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    config: ConfigRecord = msg.content["config"]
    start = time.perf_counter()
    data = local_data(context, settings, int(config["max-examples"]))
    loader = data.loader(int(config["batch-size"]), shuffle=True, seed=settings.seed)
    torch.manual_seed(settings.seed + int(config["server-round"]) * 1000 + context.node_id % 1000)
    level = float(config["level"])
    if settings.method == "dress":
        packed = subnet_from_record(msg.content["arrays"])
        losses = train(packed, loader, train_config_of(config))
        trained = upload_record(packed.eval())
    else:
        tensors, losses = train_peer(copy.deepcopy(_peer_model(settings)), msg.content["arrays"].to_torch_state_dict(),
                                     level, get_method(settings.method), loader, train_config_of(config),
                                     seed=settings.seed + int(config["server-round"]))
        trained = ArrayRecord(torch_state_dict=tensors)
    return train_reply(msg, trained, {
        "num-examples": len(data), "density": level, "train-loss": float(losses.get(level, 0.0)),
        "compute-s": time.perf_counter() - start})


@functools.lru_cache(maxsize=2)
def _peer_model(settings: RunSettings) -> DressModel:
    return build_run_model(settings)


def train_peer(model: DressModel, received: dict[str, torch.Tensor], level: float, method: Method,
               loader: DataLoader, config: TrainConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict[float, float]]:
    """A peer method's device: load its level's prefixes into ``model``, train as the method does, return the
    trained prefixes (and the last losses). ValueError when the tensors are not the level's."""
    try:
        slices = load_prefixes(model, level, received)
    except ValueError as e:
        raise ValueError(f"train message {e}") from None
    if method.sampled:
        levels = tuple(d for d in model.densities if d <= level + 1e-9)
        losses = train_ordered_dropout(model, loader, dataclasses.replace(config, densities=levels), seed=seed)
    else:
        losses = train(model, loader, dataclasses.replace(config, densities=(level,)))
    return prefix_tensors(model, slices), losses
