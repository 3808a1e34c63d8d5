"""What the device's Predict ran per density since its last heartbeat: the metering the coordinator is told."""

from __future__ import annotations

import threading

Use = tuple[int, float, float]  # requests, busy ms, summed confidence (each request's mean top-class probability)


class UsageLedger:
    """What Predict ran per density since the coordinator last heard of it: (requests, busy ms, summed
    confidence) — how much, how fast and how sure, which a staged rollout compares between model versions.

    The heartbeat takes it; if the heartbeat fails it puts it back, so nothing is counted twice or lost. It
    reports it as served by ``version``, the model version served now (a heartbeat that spans a swap counts the
    few requests before it with the new version)."""

    def __init__(self, version: str = "") -> None:
        self._lock = threading.Lock()
        self._usage: dict[float, Use] = {}
        self.version = version

    def add(self, density: float, requests: int, busy_ms: float, confidence_sum: float = 0.0) -> None:
        with self._lock:
            old_requests, old_ms, old_confidence = self._usage.get(density, (0, 0.0, 0.0))
            self._usage[density] = (old_requests + requests, old_ms + busy_ms, old_confidence + confidence_sum)

    def take(self) -> dict[float, Use]:
        with self._lock:
            usage, self._usage = self._usage, {}
            return usage

    def put_back(self, usage: dict[float, Use]) -> None:
        for density, use in usage.items():
            self.add(density, *use)
