"""The model an agent serves: one packed model holds every subnet, so a new density assignment is `set_density`
(no copy, no reload); a new version is swapped in under the same lock every forward pass holds, so a request
never sees half a switch.

The one place that decides which density answers: the densest stored subnet within the coordinator's assignment
and the device's own choice from its live budget (``serving_density``), and for a request with a deadline the
densest of those the latency model expects to meet it."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

from agent.latency import LatencyModel
from agent.usage import UsageLedger
from dress_model.packed import PackedModel


def serving_density(stored: tuple[float, ...], assigned: float, local: float | None = None) -> float:
    """The densest stored subnet within the coordinator's ``assigned`` density and the device's own ``local``
    choice (None: none yet); the sparsest when none is (it is the least bad)."""
    cap = assigned if local is None else min(assigned, local)
    return max((d for d in stored if d <= cap), default=min(stored))


@dataclass(frozen=True, slots=True)
class ServedState:
    """What is served, read in one go so a concurrent swap cannot mix two models' answers."""

    density: float
    assigned_density: float
    version: str
    densities: tuple[float, ...]


class ServedModel:
    """The model Predict runs: density switches and version swaps are atomic with respect to requests."""

    def __init__(self, packed: PackedModel, assigned_density: float, version: str = "",
                 latency: LatencyModel | None = None) -> None:
        self._lock = threading.Lock()
        self._packed, self._assigned, self._local, self._version = packed, assigned_density, None, version
        self.latency = latency or LatencyModel({})  # what a request's deadline is judged by
        self.usage = UsageLedger(version)  # what ran, for the heartbeat
        packed.set_density(serving_density(packed.densities, assigned_density))

    @property
    def packed(self) -> PackedModel:
        return self._packed

    @property
    def version(self) -> str:
        return self._version

    @property
    def assigned_density(self) -> float:
        return self._assigned

    def state(self) -> ServedState:
        with self._lock:
            return ServedState(self._packed.active_density, self._assigned, self._version, self._packed.densities)

    def set_density(self, assigned: float, local: float | None = None) -> float:
        """Follow the coordinator's assignment and the device's own choice in O(1): the layers read a different
        prefix of the same buffers. Returns the density that serves now."""
        with self._lock:
            self._assigned, self._local = assigned, local
            self._packed.set_density(serving_density(self._packed.densities, assigned, local))
            return self._packed.active_density

    def swap(self, packed: PackedModel, version: str) -> None:
        """Serve `packed` from the next request on, at the current assignment."""
        with self._lock:
            packed.set_density(serving_density(packed.densities, self._assigned, self._local))
            self._packed, self._version = packed, version
            self.usage.version = version

    def predict(self, x: torch.Tensor, deadline_ms: float = 0.0) -> tuple[torch.Tensor, float, float]:
        """(logits, density, latency_ms) for a [N, C, H, W] batch; ValueError if it does not fit the model.

        With a deadline the densest subnet up to the assigned one that the latency model expects to meet it
        answers (the sparsest if none is expected to), for this request only: one store to switch, one back."""
        if not (math.isfinite(deadline_ms) and deadline_ms >= 0):
            raise ValueError(f"deadline_ms must be a finite number >= 0 (0: none), got {deadline_ms}")
        with self._lock:
            arch = self._packed.arch
            expected = (arch.in_channels, arch.image_size, arch.image_size)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"input shape {list(x.shape[1:])} does not match the model's "
                                 f"[C, H, W] = {list(expected)}")
            assigned = self._packed.active_density
            density = assigned
            if deadline_ms > 0:
                allowed = [d for d in self._packed.densities if d <= assigned]
                density = self.latency.densest_within(allowed, x.shape[0], deadline_ms) or min(allowed)
            self._packed.set_density(density)
            try:
                start = time.perf_counter()
                logits = self._packed(x)
                latency_ms = 1000 * (time.perf_counter() - start)
            finally:
                self._packed.set_density(assigned)
            self.latency.observe(density, x.shape[0], latency_ms)
            confidence = float(torch.softmax(logits.float(), dim=-1).amax(dim=-1).mean())
            self.usage.add(density, 1, latency_ms, confidence if math.isfinite(confidence) else 0.0)
            return logits, density, latency_ms
