"""What the device's Predict ran per density since its last heartbeat: the metering the coordinator is told."""

from __future__ import annotations

import threading


class UsageLedger:
    """What Predict ran per density since the coordinator last heard of it: (requests, busy ms).

    The heartbeat takes it; if the heartbeat fails it puts it back, so nothing is counted twice or lost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[float, tuple[int, float]] = {}

    def add(self, density: float, requests: int, busy_ms: float) -> None:
        with self._lock:
            old_requests, old_ms = self._usage.get(density, (0, 0.0))
            self._usage[density] = (old_requests + requests, old_ms + busy_ms)

    def take(self) -> dict[float, tuple[int, float]]:
        with self._lock:
            usage, self._usage = self._usage, {}
            return usage

    def put_back(self, usage: dict[float, tuple[int, float]]) -> None:
        for density, (requests, busy_ms) in usage.items():
            self.add(density, requests, busy_ms)
