"""How long an agent's retry loop waits after failures in a row: exponential backoff with jitter and a cap.

A device that lost its network must neither hammer the coordinator when it returns nor spin while it is gone;
and a fleet that lost its coordinator must not come back to it in lockstep. So each failure in a row doubles
the wait, up to a cap, and each wait is drawn at random from the upper half of that (the heartbeat, the model
download; Flower's SuperNode backs off on its own, capped at 20 s).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """The wait before the next try: ``base`` while nothing failed, then ``base × 2^failures`` capped at ``cap``,
    times a random factor in [1 - ``jitter``, 1]."""

    base: float
    cap: float
    jitter: float = 0.5
    failures: int = 0  # in a row, since the last success
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.base <= 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"backoff needs base > 0 and jitter in [0, 1), got base {self.base}, jitter {self.jitter}")
        self.cap = max(self.cap, self.base)

    def delay(self) -> float:
        """Seconds to wait now: ``base`` after a success, backing off after failures."""
        if not self.failures:
            return self.base
        return min(self.base * 2.0 ** min(self.failures, 64), self.cap) * self.rng.uniform(1 - self.jitter, 1)

    def failed(self) -> bool:
        """Count a failure; True when it is the first in a row (the moment to say so, once)."""
        self.failures += 1
        return self.failures == 1

    def succeeded(self) -> int:
        """Count a success; how many failures in a row it ends (0: nothing was wrong)."""
        ended, self.failures = self.failures, 0
        return ended
