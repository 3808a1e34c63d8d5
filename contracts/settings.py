"""Run settings: one typed object, carried as Flower's run config, read back by the ServerApp and ClientApp.

The defaults are written once, in the Flower app's own config (``[tool.flwr.app.config]`` of the repository's
``pyproject.toml``), which is where Flower reads them when anyone — our CLIs or an operator's own
``flwr run`` — submits the app. ``RunSettings`` gives them types and checks; the CLIs build one from those
defaults plus their options and submit every key with ``--run-config``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from contracts.methods import METHODS, get_method
from contracts.profiles import assign_profiles, load_profiles, parse_mix
from dress_model.data import DATASETS, training_indices
from dress_model.models import MODELS, Architecture, DressModel, model_for_dataset
from dress_model.partition import parse_partition
from dress_model.sparsity import DEFAULT_DENSITIES, format_densities, parse_densities
from dress_model.training import JOINT_RULES
from protos.dress.fleet.v1 import control_plane_pb2 as pb

APP_DIR = Path(__file__).resolve().parent.parent
"""The Flower app: the repository root, whose pyproject.toml holds ``[tool.flwr.app]``."""
APP_CONFIG = APP_DIR / "pyproject.toml"

RunConfig = dict[str, bool | int | float | str]
STALE_HEARTBEATS = 6


@dataclass(frozen=True)
class Aggregation:
    """How the server averages a weight over the devices that trained it (``coordinator.aggregation``)."""

    name: str  # mean (examples-weighted, FedAvg), median, trimmed-mean (coordinate-wise, over the holders)
    trim: float = 0.0  # trimmed-mean: the share of holders cut from each end

    @classmethod
    def parse(cls, spec: str) -> Aggregation:
        """'mean', 'median' or 'trimmed-mean:BETA' with BETA in (0, 0.5)."""
        name, _, arg = spec.partition(":")
        if name in ("mean", "median") and not arg:
            return cls(name)
        if name == "trimmed-mean":
            try:
                trim = float(arg)
            except ValueError:
                trim = math.nan
            if 0 < trim < 0.5:
                return cls(name, trim)
        raise ValueError(f"aggregation must be mean, median or trimmed-mean:BETA with BETA in (0, 0.5), got {spec!r}")


MEAN = Aggregation("mean")


class SettingsError(ValueError):
    """A run setting is missing, of the wrong type or out of range; the message names it and what is expected."""


@dataclass(frozen=True)
class RunSettings:
    """What a federated DRESS run does; each field is a run-config key with '_' written '-'."""

    method: str  # dress, or a peer trained on the same fleet (contracts.methods)
    num_rounds: int
    fraction: float  # share of online devices trained per round
    min_devices: int  # per round, when that many are online
    wait_for_nodes: int  # Flower nodes that must be connected before round 1
    densities: str  # the subnets the backbone holds, densest first; "" = the method's default list
    model: str
    width: int
    dataset: str
    data_dir: str  # where dataset files are; "" = the default location
    partition: str  # iid, dirichlet:ALPHA, labels:K or profile[:LEAN]
    mix: str  # a simulated fleet's profiles, PROFILE=PERCENT: the simulation builds it, a profile partition leans by it
    validation: int  # training images held out of the shards; > 0: the server evaluates on them (tuning)
    seed: int
    epochs: float  # local epochs per round
    compute_matched: bool  # each device spends what `epochs` passes of its level's subnet cost (agent.local_training)
    lr: float
    lr_decay: float  # the last round's learning rate as a share of lr (cosine over the rounds; 1 = constant)
    aggregation: str  # mean, median or trimmed-mean:BETA (Aggregation): robust ones resist lying devices
    server_momentum: float  # the server's momentum on each round's aggregated update (FedAvgM; 0 = plain averaging)
    server_average: float  # published model = this share of the previous one + the rest of the round's (0 = off)
    damped: bool  # a weight moves by the share of the round's examples (weight) that trained it; False: to their average
    distill: float  # anchor-loss weight for densities above the sparsest a device trains (dress_model.training)
    distill_decay: float  # the last round's anchor weight as a share of distill (cosine like lr; 1 = constant); DRESS
    joint: str  # what a DRESS device's local step trains (dress_model.training.JOINT_RULES)
    batch_size: int
    max_examples: int  # per device per round; 0 = its whole shard
    eval_examples: int  # test images the server evaluates each density on; 0 = all
    heartbeat_s: float  # devices heartbeat at least this often (the control plane tells them)
    node_auth: bool  # the SuperLink admits only SuperNodes the coordinator registered at enrollment (TLS fleets)
    state_dir: str  # registry, checkpoints and Flower state
    db_url: str = ""  # registry URL; "" = SQLite in state_dir. Kept by the coordinator, never in the run config

    def __post_init__(self) -> None:
        checks = [
            (self.num_rounds >= 1, "num-rounds", "an integer >= 1"),
            (0 < self.fraction <= 1, "fraction", "a number in (0, 1]"),
            (self.min_devices >= 1, "min-devices", "an integer >= 1"),
            (self.wait_for_nodes >= 0, "wait-for-nodes", "an integer >= 0"),
            (self.width >= 1, "width", "an integer >= 1"),
            (self.epochs > 0, "epochs", "a number > 0"),
            (self.lr >= 0, "lr", "a number >= 0"),
            (0 < self.lr_decay <= 1, "lr-decay", "a number in (0, 1]"),
            (0 <= self.server_momentum < 1, "server-momentum", "a number in [0, 1)"),
            (0 <= self.server_average < 1, "server-average", "a number in [0, 1)"),
            (0 <= self.distill < 1, "distill", "a number in [0, 1)"),
            (0 <= self.distill_decay <= 1, "distill-decay", "a number in [0, 1]"),
            (self.joint in JOINT_RULES, "joint", f"one of {', '.join(JOINT_RULES)}"),
            (self.joint != "sandwich" or self.distill == 0, "distill", "0 with joint sandwich (it distils from the "
             "densest subnet, not towards the sparsest)"),
            (self.batch_size >= 1, "batch-size", "an integer >= 1"),
            (self.max_examples >= 0, "max-examples", "an integer >= 0 (0 = the whole shard)"),
            (self.eval_examples >= 0, "eval-examples", "an integer >= 0 (0 = the whole test split)"),
            (self.validation >= 0, "validation", "an integer >= 0 (0 = evaluate on the test split)"),
            (0 < self.heartbeat_s <= 3600, "heartbeat-s", "a number of seconds in (0, 3600]"),
            (self.model in MODELS, "model", f"one of {', '.join(MODELS)}"),
            (self.dataset in DATASETS, "dataset", f"one of {', '.join(DATASETS)}"),
            (self.method in METHODS, "method", f"one of {', '.join(METHODS)}"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise SettingsError(f"run setting {key} must be {expected}, got {getattr(self, _field(key))!r}")
        try:
            densities = parse_densities(self.densities) if self.densities else DEFAULT_DENSITIES
            object.__setattr__(self, "densities", format_densities(densities))
            parse_partition(self.partition)
            parse_mix(self.mix, list(load_profiles()))
            if Aggregation.parse(self.aggregation) != MEAN and self.method != "dress":
                raise ValueError(f"aggregation {self.aggregation} is DRESS's; {self.method} averages as it was "
                                 "published (aggregation mean)")
        except ValueError as e:
            raise SettingsError(f"run setting: {e}") from None

    @property
    def stale_after(self) -> timedelta:
        """A device silent this long is offline and not sampled: several heartbeats lost, not one late."""
        return timedelta(seconds=STALE_HEARTBEATS * self.heartbeat_s)

    def shards(self, labels: np.ndarray, parts: int) -> list[np.ndarray]:
        """Every device's shard of the training split (indices into it; the validation hold-out left out), by
        partition-id: what a simulated device trains on, and what a benchmark reads a device's classes from."""
        kept = training_indices(len(labels), self.validation, self.seed)
        spec = parse_partition(self.partition)
        groups = self.partition_groups(parts) if spec.kind == "profile" else None
        return [kept[p] for p in spec.split(labels[kept], parts, self.seed, groups)]

    def partition_groups(self, parts: int) -> list[str]:
        """Each partition-id's device profile in a fleet of ``parts`` devices built from ``mix``: what a profile
        partition leans by, and the profiles a simulation gives its devices."""
        return assign_profiles(parse_mix(self.mix, list(load_profiles())), parts, self.seed)

    def lr_at(self, server_round: int) -> float:
        """The peak local learning rate of a round: cosine from ``lr`` in round 1 to ``lr × lr_decay`` in the last.

        Devices sent a constant rate keep the global model as noisy as one round's local steps make it (the
        federated benchmark stalled about 3 points under centralized training); centralized training anneals
        its rate, and so does this, across rounds (each device still runs its own one-cycle within a round)."""
        return self.lr * self._cosine(server_round, self.lr_decay)

    def distill_at(self, server_round: int) -> float:
        """The anchor-loss weight of a round: cosine from ``distill`` to ``distill × distill_decay``.

        Early on the bands above the sparsest subnet hold little the fleet agreed on, and the anchor keeps the
        few devices that train them from pulling them their own way; late in a run they are trained, and
        the anchor would only hold the densest subnet at the sparsest one's accuracy."""
        return self.distill * self._cosine(server_round, self.distill_decay)

    def _cosine(self, server_round: int, final_share: float) -> float:
        """1 in round 1, ``final_share`` in the last round, cosine in between."""
        progress = min(1.0, max(0.0, (server_round - 1) / max(1, self.num_rounds - 1)))
        return final_share + (1 - final_share) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def density_list(self) -> tuple[float, ...]:
        """Ascending, as dress_model takes them."""
        return parse_densities(self.densities)

    def architecture(self) -> pb.Architecture:
        """What the coordinator tells agents they run (Describe, RegisterResponse)."""
        return pb.Architecture(model=self.model, densities=self.density_list, width=self.width, dataset=self.dataset)

    @property
    def model_label(self) -> str:
        """Which network this is, in words: what a saved calibration must have been measured on."""
        return f"{self.model} width {self.width} on {self.dataset}"

    @property
    def task(self) -> str:
        """What is learnt, as result rows and the centralized reference name it (``task_name``)."""
        return task_name(self.dataset, self.model, self.width)

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def to_run_config(self) -> RunConfig:
        """Every setting but those kept local: a run's config is shown to whoever lists runs at the SuperLink,
        and a database URL may hold a password (the ServerApp finds the registry through ``state_dir``)."""
        return {_key(f.name): getattr(self, f.name) for f in _sent()}

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Read a complete run config (what Flower hands the apps); unknown, missing or mistyped keys fail."""
        expected = {_key(f.name): f for f in _sent()}
        unknown, missing = sorted(set(config) - set(expected)), sorted(set(expected) - set(config))
        if unknown or missing:
            raise SettingsError(f"run config: unknown keys {unknown}, missing keys {missing}; expected {sorted(expected)}")
        values = {}
        for key, f in expected.items():
            values[f.name] = _coerce(key, config[key], _TYPES[f.type])
        return cls(**values)

    @classmethod
    def defaults(cls, **changes: Any) -> RunSettings:
        """The app's defaults with `changes` (field names) applied."""
        return cls.from_run_config(app_config_defaults()).replace(**changes)


def task_name(dataset: str, model: str, width: int) -> str:
    """``DATASET-MODEL``, with ``-wWIDTH`` when the width is not the models' default: ``fashion-mnist-cnn-w3``."""
    base = f"{dataset}-{model}"
    return base if width == Architecture.width else f"{base}-w{width}"


def build_model(architecture: pb.Architecture) -> DressModel:
    """A freshly initialised model of the architecture: what a run starts from and what a device calibrates.

    ValueError for an architecture this build of dress-fleet cannot make (unknown model or dataset)."""
    return model_for_dataset(architecture.model, tuple(architecture.densities), architecture.dataset,
                             architecture.width)


def build_run_model(settings: RunSettings) -> DressModel:
    """The global model of the run's method: the DRESS backbone, or a peer's width-nested twin of it.

    ValueError when the method cannot build one of the tiers (say, a width too small to exist)."""
    return get_method(settings.method).build(build_model(settings.architecture()))


LOCAL_SETTINGS = ("db_url",)


def _sent() -> list[dataclasses.Field]:
    """The settings a run config carries (all but LOCAL_SETTINGS)."""
    return [f for f in fields(RunSettings) if f.name not in LOCAL_SETTINGS]


_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _field(key: str) -> str:
    return key.replace("-", "_")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """TOML and Flower keep 1 and 1.0 apart; a float setting accepts an integer, nothing else converts."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"run setting {key} must be true or false, got {value!r}")
        return value
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SettingsError(f"run setting {key} must be {kind.__name__}, got {value!r}")
    return value


@functools.cache
def app_config_defaults(path: Path = APP_CONFIG) -> RunConfig:
    """``[tool.flwr.app.config]`` of the Flower app: every run setting's default."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    except FileNotFoundError:
        raise SettingsError(
            f"the Flower app config {path} is missing: dress-fleet's coordinator runs from its source tree "
            "(pip install -e .), whose pyproject.toml is the Flower app") from None
    except KeyError:
        raise SettingsError(f"{path} has no [tool.flwr.app.config] table") from None
    return dict(config)
