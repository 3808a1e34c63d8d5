"""What a forward pass at each density is expected to take: a latency model learnt from the passes the device ran,
which a request's deadline is judged by (``agent.served_model``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

LATENCY_WINDOW = 100  # passes the latency model remembers: 2 s of requests at 50 a second


class LatencyModel:
    """Expected milliseconds of a forward pass per density: the calibrated cost per image times the largest
    slowdown (measured over calibrated cost) of the last ``window`` passes.

    Load stretches a pass: throttling and a busy process sharing the core slow every operation, and the
    scheduler now and then makes the agent wait. Either way the slowdown is what one pass says about any other:
    load slows every subnet alike, so a sparse pass under load says the dense one would be late too, and once
    the load is gone the sparse passes bring the dense ones back (a per-density estimate would keep the dense
    subnet's last slow reading forever). The largest of the window, not its median: tails are what make
    answers late, so while slow passes keep coming only subnets with that much slack answer, and a window
    (2 s at 50 requests a second) after the last one the denser subnets are back (replayed against another
    model: docs/DECISIONS.md)."""

    def __init__(self, per_image_ms: dict[float, float], window: int = LATENCY_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"the latency window must be >= 1 pass, got {window}")
        self._per_image = {d: ms for d, ms in per_image_ms.items() if ms > 0}
        self._ratios: deque[float] = deque(maxlen=window)  # measured / calibrated cost, per pass
        self.slowdown = 1.0  # what a pass is expected to take over its calibrated cost

    def expected_ms(self, density: float, batch: int) -> float | None:
        per_image = self._per_image.get(density)
        return None if per_image is None else per_image * batch * self.slowdown

    def observe(self, density: float, batch: int, measured_ms: float) -> None:
        per_image = measured_ms / max(1, batch)
        base = self._per_image.get(density)
        if base is None:  # never calibrated: its cost is what it took, at today's slowdown
            if per_image > 0:
                self._per_image[density] = per_image / self.slowdown
            return
        self._ratios.append(per_image / base)
        self.slowdown = max(self._ratios)

    def densest_within(self, densities: Iterable[float], batch: int, deadline_ms: float) -> float | None:
        """The densest of ``densities`` expected to answer within ``deadline_ms``; None if none is."""
        fitting = [d for d in densities if (ms := self.expected_ms(d, batch)) is not None and ms <= deadline_ms]
        return max(fitting, default=None)
