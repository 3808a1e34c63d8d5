"""The rollout judge: promotes a candidate model version to the fleet, or rolls it back, from what devices report
serving (coordinator.registry.rollouts).

Devices report, with every heartbeat, how many Predict requests each version answered at each density, how long
the forward passes took and how sure the answers were (the mean top-class probability: a label-free proxy of
accuracy that drops when a model degrades). Once the candidate's canary and the stable fleet have each answered
``MIN_REQUESTS`` since the candidate was published, the judge compares them at the densities both served: the
candidate is rolled back when its confidence is lower by more than ``MAX_CONFIDENCE_DROP`` or its forward passes
slower by more than ``MAX_SLOWDOWN``, and promoted otherwise.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from coordinator.registry import Registry
from coordinator.registry.rollouts import Served

log = logging.getLogger(__name__)

MIN_REQUESTS = 20  # per side, at the densities both served: fewer is not evidence
MAX_CONFIDENCE_DROP = 0.05  # mean top-class probability, absolute
MAX_SLOWDOWN = 1.5  # mean forward pass, candidate over stable
JUDGE_EVERY_S = 5.0


@dataclass(frozen=True)
class Verdict:
    version: str
    promote: bool
    reason: str


def compare(candidate: dict[float, Served], stable: dict[float, Served]) -> Verdict | None:
    """The verdict on the candidate's evidence against the stable version's, None while there is too little."""
    common = sorted(set(candidate) & set(stable), reverse=True)
    c_requests = sum(candidate[d].requests for d in common)
    s_requests = sum(stable[d].requests for d in common)
    if c_requests < MIN_REQUESTS or s_requests < MIN_REQUESTS:
        return None
    reasons = []
    confident = [d for d in common if candidate[d].confidence_sum is not None and stable[d].confidence_sum is not None]
    if confident:
        c_conf = sum(candidate[d].confidence_sum for d in confident) / sum(candidate[d].requests for d in confident)  # type: ignore[misc]
        s_conf = sum(stable[d].confidence_sum for d in confident) / sum(stable[d].requests for d in confident)  # type: ignore[misc]
        if s_conf - c_conf > MAX_CONFIDENCE_DROP:
            reasons.append(f"confidence {c_conf:.3f} against the stable version's {s_conf:.3f}")
    for d in common:
        c_ms, s_ms = candidate[d].busy_ms / max(1, candidate[d].requests), stable[d].busy_ms / max(1, stable[d].requests)
        if s_ms > 0 and c_ms / s_ms > MAX_SLOWDOWN:
            reasons.append(f"{c_ms:.2f} ms a request at density {d:g} against {s_ms:.2f} ms")
    evidence = f"{c_requests} canary and {s_requests} stable requests"
    if reasons:
        return Verdict("", False, f"regressed on {evidence}: " + "; ".join(reasons))
    return Verdict("", True, f"no regression on {evidence}")


def judge(registry: Registry) -> Verdict | None:
    """Decide the candidate, if there is one with enough evidence; the decision is applied and returned."""
    stable, candidate, _ = registry.rollout()
    if candidate is None or stable is None:
        return None
    published = next(v.created_at for v in registry.list_versions() if v.version == candidate)
    evidence = registry.serving_evidence(since=published)
    verdict = compare(evidence.get(candidate, {}), evidence.get(stable, {}))
    if verdict is None:
        return None
    verdict = Verdict(candidate, verdict.promote, verdict.reason)
    if verdict.promote:
        registry.promote(candidate, verdict.reason)
    else:
        registry.roll_back(candidate, verdict.reason)
    log.warning("model version %s %s: %s", candidate, "promoted" if verdict.promote else "rolled back",
                verdict.reason)
    return verdict


class RolloutJudge:
    """``judge`` every JUDGE_EVERY_S on a thread of the coordinator's process, until stopped."""

    def __init__(self, registry: Registry, every_s: float = JUDGE_EVERY_S) -> None:
        self.registry, self.every_s = registry, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-judge", daemon=True)

    def start(self) -> RolloutJudge:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                judge(self.registry)
            except Exception:  # noqa: BLE001 - a registry hiccup must not end the judging; said, then tried again
                log.exception("judging the candidate model version failed; trying again in %g s", self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
