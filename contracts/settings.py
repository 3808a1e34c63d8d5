"""Run settings: one typed object, carried as Flower's run config, read back by the ServerApp and ClientApp.

Each setting is declared once, in ``RunSettings``: type, default, help, option. From that declaration come the
options of ``dress-fleet coordinator start`` and ``simulate`` (``cli/run_options.py``) and the Flower app's
config table (``contracts/app/pyproject.toml``, which Flower needs to list every key; a test checks it matches).
The CLIs submit every key with ``--run-config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from contracts.methods import METHODS, get_method
from contracts.profiles import assign_profiles, load_profiles, parse_mix
from dress_model.data import DATASETS, training_indices
from dress_model.models import MODELS, Architecture, DressModel, architecture_for_dataset, create_model
from dress_model.partition import parse_partition
from dress_model.sparsity import DEFAULT_DENSITIES, format_densities, parse_densities
from dress_model.training import ANCHORED_RULES, JOINT_RULES

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower app the coordinator submits (``flwr run``): a pyproject.toml holding ``[tool.flwr.app]``, shipped in
the package, so an installed dress-fleet runs outside a source checkout."""
APP_CONFIG = APP_DIR / "pyproject.toml"

RunConfig = dict[str, bool | int | float | str]
STALE_HEARTBEATS = 6
HEARTBEATS_PER_S = 200.0
"""The most heartbeats a second a fleet is asked for: past this many devices per second of --heartbeat-s, the
period devices are told grows with the fleet. About a third of what the registry answered while a 10,000-device
fleet trained on 2 cores (benchmarks/results/scale.json: 475/s on PostgreSQL, 643/s on SQLite)."""


def heartbeat_period_s(heartbeat_s: float, devices: int) -> float:
    """The period a fleet of ``devices`` is told to heartbeat at: ``heartbeat_s``, or longer where the whole fleet
    would send more than ``HEARTBEATS_PER_S`` — so the registry keeps up with any fleet by default."""
    return max(heartbeat_s, devices / HEARTBEATS_PER_S)


def stale_after(heartbeat_s: float, devices: int) -> timedelta:
    """A device silent this long is offline and not sampled: several of its fleet's periods, not one late."""
    return timedelta(seconds=STALE_HEARTBEATS * heartbeat_period_s(heartbeat_s, devices))


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

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the run-config key at fault, when one is


@dataclass(frozen=True)
class Declared:
    """What a run setting tells people: its help, its command-line option (``None``: not on the command line
    of ``coordinator start`` and ``simulate``; a switch is ``--on/--off``), and whether only DRESS reads it (a
    peer's run is the same whatever its value: a benchmark redoes only DRESS's runs when it changes)."""

    help: str
    option: str | None
    dress_only: bool = False


MODEL_HELP = f"One of {', '.join(MODELS)}."
DATASET_HELP = f"One of {', '.join(DATASETS)}."


def setting(default: Any, help: str, option: str | None = "", dress_only: bool = False) -> Any:
    """A run setting's one declaration: default, help, option (``""``: ``--KEY``, its run-config key), and
    whether only DRESS reads it (``Declared.dress_only``)."""
    return field(default=default, metadata={"declared": Declared(help, option, dress_only)})


@dataclass(frozen=True)
class RunSettings:
    """What a federated run does. Each field is declared once, here: its type, default and help; ``__post_init__``
    checks its range. Its run-config key is its name with '_' written '-'; the commands' options and the Flower
    app's config (``contracts/app/pyproject.toml``, checked by a test) are made from these declarations."""

    method: str = setting("dress", f"What the fleet trains: {', '.join(METHODS)} (DRESS or a peer on the same "
                          "fleet, per-density parameter counts matched).")
    num_rounds: int = setting(10, "Federated rounds.", "--rounds")
    fraction: float = setting(0.1, "Share of online devices trained per round.")
    min_devices: int = setting(1, "Devices trained per round at least, when that many are online.", None)
    wait_for_nodes: int = setting(1, "Flower nodes that must be connected before round 1.", None)
    densities: str = setting("", "Subnet densities the backbone holds, densest first (empty: the method's "
                             f"default, {format_densities(DEFAULT_DENSITIES)}).")
    model: str = setting("cnn", MODEL_HELP)
    width: int = setting(16, "Base channel width of the model.")
    dataset: str = setting("fashion-mnist", DATASET_HELP)
    data_dir: str = setting("", "Directory holding the dataset files (empty: where the dataset's package puts "
                            "them).")
    partition: str = setting("iid", "How the training split is shared out: iid, dirichlet:ALPHA (non-IID by "
                             "label), labels:K (HeteroFL's K classes per device) or profile[:LEAN] (each device "
                             "profile of --mix leans to its own classes: LEAN of a device's examples, default 0.8).")
    mix: str = setting("laptop-x86=20,jetson-orin-nano=10,phone=30,jetson-nano=20,pi4=20",
                       "The fleet's device profiles, PROFILE=PERCENT pairs summing to 100 (profiles: "
                       f"{', '.join(load_profiles())}): which device a simulation's partition-id is, and what a "
                       "profile partition leans by.")
    validation: int = setting(0, "Training images held out of every device's shard; > 0: the server evaluates on "
                              "them instead of the test split (tuning without touching the test split).")
    seed: int = setting(0, "Seeds sampling, partitions and initial weights.")
    epochs: float = setting(1.0, "Local epochs per round on a device's shard.")
    compute_matched: bool = setting(False, "--compute-matched: each device spends per round what --epochs passes "
                                    "of its own level's subnet cost, whatever the method (a DRESS step trains "
                                    "several densities, so it takes fewer); --equal-epochs: every method takes "
                                    "--epochs passes of its own steps.", "--compute-matched/--equal-epochs")
    lr: float = setting(0.05, "Device learning rate (the first round's peak).")
    lr_decay: float = setting(0.1, "The last round's learning rate as a share of --lr, cosine over the rounds "
                              "(1 = constant).")
    aggregation: str = setting("mean", "Per weight over the devices that trained it: mean (FedAvg), median or "
                               "trimmed-mean:BETA (robust to a minority of lying devices; DRESS only).")
    server_momentum: float = setting(0.0, "Momentum of the server's step along each round's averaged update "
                                     "(FedAvgM; 0 = plain averaging).")
    server_average: float = setting(0.7, "The published (evaluated, served) model is an exponential average of "
                                    "the rounds' models: this share of the previous one (0 = each round's model as "
                                    "it is). Averages out the few devices that train the densest bands each round.")
    server_distill: int = setting(0, "Server-side ensemble distillation (FedDF): after aggregation the round's "
                                  "devices, each model as it replied, teach every density of the global model on the "
                                  "server's held images (no labels), this many steps (0 = off). Any method.")
    damped: bool = setting(True, "A weight moves towards its trainers' average by their share of the round's "
                           "examples (--damped), or all the way (--undamped, HeteroFL's counting). Any method.",
                           "--damped/--undamped")
    distill: float = setting(0.0, "Anchor-loss weight: a DRESS device's denser subnets also match the sparsest one "
                             "it received (0 = off; --joint all, sum, band or own only).", dress_only=True)
    distill_decay: float = setting(0.0, "The last round's anchor weight as a share of --distill, cosine over the "
                                   "rounds (1 = constant).", dress_only=True)
    joint: str = setting("own", "What a DRESS device's local step trains: own (its own density alone, the sparser "
                         "ones nested in it: the fleet trains every density jointly, each device the subnet its "
                         "budget allows; docs/DECISIONS.md), all (every density at or below its own, mean loss), "
                         "sum (the same, losses summed), band (summed, each weight's gradient divided by how many of "
                         "those subnets hold it), sandwich (its own density on the labels; the sparsest and one "
                         "drawn between learn from its predictions), ends (its own and the sparsest, summed), "
                         "sandwich-labels (its own, the sparsest and one drawn between, each on the labels, "
                         "summed) or own-drawn (one density a step: its own on half the steps, a sparser one drawn "
                         "on the others); all but all, sum, band and own need --distill 0.", dress_only=True)
    logit_adjust: float = setting(1.0, "Logit adjustment: a device's loss sees its logits plus this × the log of its "
                                  "own label frequencies (one example per class added), so its shard's label skew "
                                  "stays in the loss, not in the weights it sends back (Menon et al. 2021; FedLC; "
                                  "docs/DECISIONS.md); 0 = off. Any method; on IID shards it changes next to nothing.")
    batch_size: int = setting(32, "Examples per local step.")
    max_examples: int = setting(0, "Cap on a device's examples per round (0 = its whole shard).")
    eval_examples: int = setting(2000, "Test images the server evaluates every density on each round (0 = all); "
                                 "the last round's model is evaluated on the whole split.")
    heartbeat_s: float = setting(5.0, "Devices heartbeat at least this often (seconds); a fleet larger than "
                                 f"{HEARTBEATS_PER_S:g} devices per second of it is told a longer period (devices "
                                 f"/ {HEARTBEATS_PER_S:g}). Silent for {STALE_HEARTBEATS} periods, a device is "
                                 "offline.", "--heartbeat-s")
    round_timeout_s: float = setting(3600.0, "How long a round waits for its devices' updates (seconds); then it "
                                     "goes on with those that arrived (a device cut off or too slow misses the "
                                     "round), and a device whose calibrated training would not fit it sits the "
                                     "round out.", "--round-timeout")
    canary: float = setting(0.0, "Staged rollouts: the share of devices a newly published model version goes to "
                            "first, while the coordinator compares what they serve with the stable version and "
                            "promotes it to the fleet or rolls it back (0: every version goes to the fleet at once).")
    node_auth: bool = setting(False, "Only SuperNodes the coordinator registered at enrollment connect, and each "
                              "node's device is the one whose key it holds (the coordinator sets it with --certs).",
                              None)
    state_dir: str = setting("state", "Registry, checkpoints and Flower state.", None)
    db_url: str = setting("", "Registry URL; empty: SQLite in state_dir. Kept by the coordinator, never in the run "
                          "config.", None)

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
            (self.logit_adjust >= 0, "logit-adjust", "a number >= 0"),
            (0 <= self.server_momentum < 1, "server-momentum", "a number in [0, 1)"),
            (0 <= self.server_average < 1, "server-average", "a number in [0, 1)"),
            (self.server_distill >= 0, "server-distill", "an integer >= 0 (0 = off)"),
            (0 <= self.distill < 1, "distill", "a number in [0, 1)"),
            (0 <= self.distill_decay <= 1, "distill-decay", "a number in [0, 1]"),
            (self.joint in JOINT_RULES, "joint", f"one of {', '.join(JOINT_RULES)}"),
            (self.joint in ANCHORED_RULES or self.distill == 0, "distill",
             f"0 with joint {self.joint} (it picks what its subnets learn from: no anchor to the sparsest; "
             f"{', '.join(ANCHORED_RULES)} take one)"),
            (self.batch_size >= 1, "batch-size", "an integer >= 1"),
            (self.max_examples >= 0, "max-examples", "an integer >= 0 (0 = the whole shard)"),
            (self.eval_examples >= 0, "eval-examples", "an integer >= 0 (0 = the whole test split)"),
            (self.validation >= 0, "validation", "an integer >= 0 (0 = evaluate on the test split)"),
            (0 < self.heartbeat_s <= 3600, "heartbeat-s", "a number of seconds in (0, 3600]"),
            (0 <= self.canary <= 1, "canary", "a share of the fleet in [0, 1]"),
            (self.round_timeout_s > 0, "round-timeout-s", "a number of seconds > 0"),
            (self.model in MODELS, "model", f"one of {', '.join(MODELS)}"),
            (self.dataset in DATASETS, "dataset", f"one of {', '.join(DATASETS)}"),
            (self.method in METHODS, "method", f"one of {', '.join(METHODS)}"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise SettingsError(f"run setting {key} must be {expected}, got {getattr(self, _field(key))!r}", key)
        key = "densities"
        try:
            densities = parse_densities(self.densities) if self.densities else DEFAULT_DENSITIES
            object.__setattr__(self, "densities", format_densities(densities))
            key = "partition"
            parse_partition(self.partition)
            key = "mix"
            parse_mix(self.mix, list(load_profiles()))
            key = "aggregation"
            if Aggregation.parse(self.aggregation) != MEAN and self.method != "dress":
                raise ValueError(f"aggregation {self.aggregation} is DRESS's; {self.method} averages as it was "
                                 "published (aggregation mean)")
        except ValueError as e:
            raise SettingsError(f"run setting {key}: {e}", key) from None

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

    def architecture(self) -> Architecture:
        """The run's model: what the coordinator tells agents they run (Describe, RegisterResponse)."""
        return architecture_for_dataset(self.model, self.density_list, self.dataset, self.width)

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
            values[f.name] = _coerce(key, config[key], SETTING_TYPES[f.type])
        return cls(**values)

    @classmethod
    def defaults(cls, **changes: Any) -> RunSettings:
        """The declared defaults with `changes` (field names) applied."""
        return cls(**changes)

    @staticmethod
    def declared() -> list[tuple[dataclasses.Field, Declared]]:
        """Every setting with its declaration, in declaration order."""
        return [(f, f.metadata["declared"]) for f in fields(RunSettings)]


def task_name(dataset: str, model: str, width: int) -> str:
    """``DATASET-MODEL``, with ``-wWIDTH`` when the width is not the models' default: ``fashion-mnist-cnn-w3``."""
    base = f"{dataset}-{model}"
    return base if width == Architecture.width else f"{base}-w{width}"


def build_run_model(settings: RunSettings) -> DressModel:
    """The global model of the run's method: the DRESS backbone, or a peer's width-nested twin of it.

    ValueError when the method cannot build one of the densities (say, a width too small to exist)."""
    return get_method(settings.method).build(create_model(settings.architecture()))


LOCAL_SETTINGS = ("db_url",)


def _sent() -> list[dataclasses.Field]:
    """The settings a run config carries (all but LOCAL_SETTINGS)."""
    return [f for f in fields(RunSettings) if f.name not in LOCAL_SETTINGS]


SETTING_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}  # a field's, by its name


def dress_only_keys() -> tuple[str, ...]:
    """The run-config keys of the settings only DRESS reads (``Declared.dress_only``)."""
    return tuple(_key(f.name) for f, declared in RunSettings.declared() if declared.dress_only)


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
            raise SettingsError(f"run setting {key} must be true or false, got {value!r}", key)
        return value
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SettingsError(f"run setting {key} must be {kind.__name__}, got {value!r}", key)
    return value


def app_config_table() -> str:
    """``[tool.flwr.app.config]`` of the Flower app (``APP_CONFIG``): every setting's declared default. Flower
    keeps only the run-config keys its app lists, so the table lists every one."""
    values = {_key(f.name): f.default for f in _sent()}
    return "[tool.flwr.app.config]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


if __name__ == "__main__":  # the Flower app's config table, for contracts/app/pyproject.toml
    print(app_config_table(), end="")
