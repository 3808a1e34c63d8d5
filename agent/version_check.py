"""Labelled checks of model versions on the device's own images (``dress-agent join --check-set``).

A device that keeps some labelled images checks every model version on them, at every density it stores,
before serving it, and reports the result with its next heartbeat. The images are the same for every version,
so the coordinator's rollout judge compares a canary device's accuracy under the candidate with its accuracy
under the stable version — which catches a version that is sure of wrong answers, which confidence cannot.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
import torch

from dress_model.data import ImageDataset, load_dataset
from dress_model.models import Architecture
from dress_model.packed import PackedModel

DEFAULT_CHECK_EXAMPLES = 256  # one device's accuracy to a standard error of ~3 pt; the judge pairs versions per device
CHECK_SET_FORM = "DATASET[:N]"

Checks = dict[tuple[str, float], tuple[int, int]]  # (version, density) -> examples, correct


def unfit(split: ImageDataset, arch: Architecture) -> str | None:
    """Why models of ``arch`` cannot be checked on ``split``'s images, or None when they can."""
    shape = (arch.in_channels, arch.image_size, arch.image_size)
    if tuple(split.images.shape[1:]) != shape:
        return f"its images are {list(split.images.shape[1:])} but the fleet's model takes {list(shape)}"
    if split.num_classes != arch.num_classes:
        return f"it has {split.num_classes} classes but the fleet's model {arch.num_classes}"
    return None


def parse_check_set(spec: str) -> tuple[str, int]:
    """``DATASET[:N]`` -> (dataset, N); ValueError saying what was expected."""
    dataset, _, count = spec.partition(":")
    if not dataset:
        raise ValueError(f"--check-set must be {CHECK_SET_FORM} (e.g. fashion-mnist:256), got {spec!r}")
    try:
        examples = int(count) if count else DEFAULT_CHECK_EXAMPLES
    except ValueError:
        raise ValueError(f"--check-set {spec!r}: N must be a whole number of images, got {count!r}") from None
    if examples < 1:
        raise ValueError(f"--check-set {spec!r}: N must be at least 1, got {examples}")
    return dataset, examples


def check_split(spec: str, data_dir: str | None = None) -> tuple[ImageDataset, int]:
    """The test split ``spec`` (``DATASET[:N]``) names and N; DataError when its files are missing, ValueError for
    a bad ``spec``."""
    dataset, examples = parse_check_set(spec)
    return load_dataset(dataset, "test", data_dir or None), examples


@dataclass(frozen=True)
class CheckSet:
    """The device's labelled check images: N of a dataset's test split, drawn by the device's name (each device
    its own, the same on every restart)."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def draw(cls, split: ImageDataset, examples: int, device: str) -> CheckSet:
        """``examples`` images of ``split`` (``check_split``), drawn by the device's name."""
        seed = int.from_bytes(hashlib.sha256(f"check-set\0{device}".encode()).digest()[:8], "big")
        picked = np.sort(np.random.default_rng(seed).choice(len(split), min(examples, len(split)), replace=False))
        chosen = split.subset(picked)
        return cls(chosen.images, chosen.labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def correct(self, packed: PackedModel) -> dict[float, int]:
        """Right answers at every density ``packed`` holds; its active density is left as it was (the model must
        not be serving: switching densities would change what Predict runs)."""
        active = packed.active_density
        right = {}
        try:
            with torch.no_grad():
                for density in packed.densities:
                    packed.set_density(density)
                    right[density] = int((packed(self.images).argmax(dim=-1) == self.labels).sum())
        finally:
            packed.set_density(active)
        return right


class CheckLedger:
    """Checks not yet reported: the heartbeat takes them and, if it fails, puts them back; a newer check of the
    same version and density replaces an older one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Checks = {}

    def add(self, checks: Checks) -> None:
        with self._lock:
            self._pending.update(checks)

    def take(self) -> Checks:
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    def put_back(self, checks: Checks) -> None:
        with self._lock:
            self._pending = {**checks, **self._pending}  # a check made meanwhile is the newer one


class VersionChecker:
    """Checks a fetched version on the device's check set and queues the result for the heartbeat."""

    def __init__(self, check_set: CheckSet, ledger: CheckLedger | None = None) -> None:
        self.check_set, self.ledger = check_set, ledger or CheckLedger()

    def __call__(self, version: str, packed: PackedModel) -> dict[float, float]:
        """Accuracy (%) per density, also queued for the coordinator."""
        right = self.check_set.correct(packed)
        n = len(self.check_set)
        self.ledger.add({(version, density): (n, correct) for density, correct in right.items()})
        return {density: 100 * correct / n for density, correct in right.items()}
