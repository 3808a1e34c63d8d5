"""The Flower ClientApp every device runs, in deployment (SuperNode) and simulation (Ray actor) alike.

A train message carries the device's subnet in the packed format (one uint8 array: the same bytes a device
stores and executes) and the round's training knobs; the data settings come from the run config. The device
jointly trains every density at or below its own with the weighted loss on its local partition, through the
packed format itself (no dense weight, mask or order is built: the subnets are prefixes of the same value
buffers, which the optimizer updates in place), and replies with the trained packed values (no indices: the
server holds them). A peer method's device trains as that method does (``agent.local_training``).
"""

from __future__ import annotations

import copy
import functools
import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from agent.local_training import compute_budget, device_seed, local_epochs, train_density
from contracts.messages import status_reply, subnet_from_record, train_reply, upload_record
from contracts.methods import get_method
from contracts.naming import simulated_name
from contracts.settings import RunSettings, build_run_model
from dress_model.baselines.slimmable import load_prefixes, prefix_tensors
from dress_model.cost import forward_macs
from dress_model.data import ImageDataset, load_dataset
from dress_model.models import DressModel, create_model
from dress_model.packed import PackedModel
from dress_model.sparsity import density_at
from dress_model.training import TrainConfig

log = logging.getLogger(__name__)
app = ClientApp()

def device_identity(context: Context) -> tuple[str, str]:
    """(device name, profile): from the SuperNode's node-config, or derived for simulated devices."""
    cfg = context.node_config
    if "device-name" in cfg:
        return str(cfg["device-name"]), str(cfg.get("profile", "unknown"))
    return simulated_name(int(cfg.get("partition-id", context.node_id))), str(cfg.get("profile", "simulated"))


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None) -> ImageDataset:
    return load_dataset(name, "train", data_dir or None)


@functools.lru_cache(maxsize=8)
def _partition(settings: RunSettings, data_dir: str | None, parts: int) -> tuple[np.ndarray, ...]:
    """The devices' shards (``RunSettings.shards``), read once per run."""
    return tuple(settings.shards(_dataset(settings.dataset, data_dir).labels.numpy(), parts))


def local_data(context: Context, settings: RunSettings, max_examples: int, seed: int) -> ImageDataset:
    """This device's shard: partition ``partition-id`` of ``num-partitions`` of the training split (less the run's
    validation hold-out), or ``max_examples`` of it drawn afresh each round with ``seed``.

    The device's own ``data-dir`` (node-config) wins over the run's: files sit where each host keeps them."""
    node = context.node_config
    part, parts = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    data_dir = str(node.get("data-dir", "")) or settings.data_dir or None
    shard = _partition(settings, data_dir, parts)[part]
    if max_examples and len(shard) > max_examples:
        shard = np.sort(np.random.default_rng(seed).choice(shard, max_examples, replace=False))
    return _dataset(settings.dataset, data_dir).subset(shard)


@app.query("status")
def status(msg: Message, context: Context) -> Message:
    """Tells the server which device this Flower node is (node-config never reaches the SuperLink)."""
    return status_reply(msg, *device_identity(context))


def train_config_of(config: ConfigRecord, settings: RunSettings, model: DressModel | PackedModel,
                    density: float, data: ImageDataset) -> TrainConfig:
    """The round's training knobs for this device (its passes: ``agent.local_training.local_epochs``)."""
    method = get_method(settings.method)
    distill = float(config["distill"])
    joint = settings.joint if method.name == "dress" else "all"
    budget = compute_budget(density, _full_model_macs(settings)) if settings.compute_matched else None
    return TrainConfig(
        epochs=local_epochs(method, model, density, float(config["epochs"]), distill, budget, joint),
        lr=float(config["lr"]),
        distill=distill,
        joint=joint,
        classes=tuple(sorted(set(data.labels.tolist()))) if method.label_split else None,
        label_counts=tuple(np.bincount(data.labels.numpy(), minlength=model.arch.num_classes).tolist())
        if settings.logit_adjust else None,
        logit_adjust=settings.logit_adjust,
        rerank_every=0,  # the device keeps the masks it was sent; the server re-ranks after aggregation
        recalibrate_batches=0,  # and the server recalibrates BN after aggregation
    )


@app.train()
def train_subnet(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    config: ConfigRecord = msg.content["config"]
    start = time.perf_counter()
    method = get_method(settings.method)
    seed = device_seed(settings.seed, int(config["server-round"]), device_identity(context)[0])
    torch.manual_seed(seed)
    data = local_data(context, settings, int(config["max-examples"]), seed)
    loader = data.loader(int(config["batch-size"]), shuffle=True, seed=seed)
    densities = _run_model(settings).densities
    try:
        density = density_at(densities, config["level"])
    except ValueError as e:
        raise ValueError(f"train message config: {e}") from None
    if settings.method == "dress":
        model: DressModel | PackedModel = subnet_from_record(msg.content["arrays"])
        slices = None
    else:
        model = copy.deepcopy(_run_model(settings))
        try:
            slices = load_prefixes(model, density, msg.content["arrays"].to_torch_state_dict())
        except ValueError as e:
            raise ValueError(f"train message {e}") from None
    train_config = train_config_of(config, settings, model, density, data)
    losses, macs = train_density(method, model, density, loader, train_config, seed)
    if slices is None:
        trained = upload_record(model.eval())  # type: ignore[arg-type]
    else:
        trained = ArrayRecord(torch_state_dict=prefix_tensors(model, slices))
    return train_reply(msg, trained, {
        "num-examples": len(data), "density": density, "train-loss": float(losses.get(density, 0.0)),
        "compute-s": time.perf_counter() - start, "macs": float(macs),
        **({"classes": list(train_config.classes)} if train_config.classes is not None else {})})


@functools.lru_cache(maxsize=2)
def _run_model(settings: RunSettings) -> DressModel:
    """The run's global model as the server builds it: its densities are what a level indexes."""
    return build_run_model(settings)


@functools.lru_cache(maxsize=2)
def _full_model_macs(settings: RunSettings) -> int:
    """MACs per example of the run's full (dense) model: what a compute-matched budget is a share of."""
    model = create_model(settings.architecture())
    return forward_macs(model, max(model.densities))
