"""What the control plane hands an agent that fetches a model: the version it is to serve, packed.

A model version is a training checkpoint the ServerApp wrote and published in the registry. Packing is
cached per (version, density) because a whole fleet fetches the same few files after each round.
"""

from __future__ import annotations

import functools
import threading

from coordinator.registry.repository import Registry
from dress_model.checkpoint import load_checkpoint
from dress_model.models import DressModel
from dress_model.packed import pack_checkpoint


class ModelStore:
    """A ``ModelProvider`` for ``coordinator.control_plane.serve``: (version, density, float16) -> packed bytes."""

    def __init__(self, registry: Registry, initial: DressModel) -> None:
        self.registry = registry
        self.initial = initial  # served until the first round publishes a version
        self._lock = threading.Lock()

    def __call__(self, version: str, density: float, half: bool = False) -> bytes:
        with self._lock:
            return self._packed(version, density, half)

    @functools.lru_cache(maxsize=8)
    def _packed(self, version: str, density: float, half: bool) -> bytes:
        model = self.initial
        if version:
            path = self.registry.model_checkpoint(version)
            if path is None:
                raise LookupError(f"model version {version} has no checkpoint")
            model, _ = load_checkpoint(path)
        if density not in model.densities:  # the control plane's densities are the run's, as the model's are
            raise LookupError(f"no subnet at density {density:g}; the model has {list(model.densities)}")
        return pack_checkpoint(model, max_density=density).to_bytes(half)
