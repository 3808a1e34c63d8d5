"""The rollout judge: promotes a candidate model version to the fleet, or rolls it back, from what devices report
serving (coordinator.registry.rollouts).

Devices report, with every heartbeat, how many Predict requests each version answered at each density, how long
the forward passes took and how sure the answers were (the mean top-class probability: a label-free proxy of
accuracy that drops when a model degrades). Once the candidate's canary and the stable fleet have each answered
``MIN_REQUESTS`` since the candidate was published (from ``MIN_DEVICES`` canary devices at least), the judge
compares them at the densities both served, each side by the median over its devices: the candidate is rolled
back when its confidence is lower by more than ``MAX_CONFIDENCE_DROP`` or its forward passes slower by more than
``MAX_SLOWDOWN``, and promoted otherwise.

Confidence cannot see a model that is sure and wrong. Devices that keep labelled images (agent ``--check-set``)
check every version on them before serving it, so a canary device has checked both the stable version and the
candidate on the same images: once ``MIN_DEVICES`` have, a median paired drop of more than
``MAX_ACCURACY_DROP_PT`` rolls the candidate back at once, whatever Predict traffic says.
"""

from __future__ import annotations

import logging
import statistics
import threading
from dataclasses import dataclass

from coordinator.registry import Registry
from coordinator.registry.rollouts import DeviceChecks, Served

log = logging.getLogger(__name__)

MIN_REQUESTS = 20  # per side, at the densities both served: fewer is not evidence
MIN_DEVICES = 3  # canary devices that reported: one or two are not the fleet
MAX_CONFIDENCE_DROP = 0.05  # mean top-class probability, absolute
MAX_SLOWDOWN = 1.5  # mean forward pass, candidate over stable
MAX_ACCURACY_DROP_PT = 2.0  # on the devices' labelled checks: the median over devices of each one's paired drop
JUDGE_EVERY_S = 5.0


@dataclass(frozen=True)
class Verdict:
    version: str
    promote: bool
    reason: str


@dataclass(frozen=True)
class Checked:
    """Canary devices' labelled checks of the candidate against their own checks of the stable version."""

    devices: int
    candidate_pct: float  # mean over the devices of each one's accuracy (mean over the densities both checked)
    stable_pct: float
    median_drop_pt: float  # the median over the devices of stable − candidate

    def text(self) -> str:
        return (f"labelled checks on {self.devices} canary devices: accuracy {self.candidate_pct:.1f} % against "
                f"the stable version's {self.stable_pct:.1f} % (median paired drop {self.median_drop_pt:.1f} pt)")


def paired_checks(candidate: DeviceChecks, stable: DeviceChecks) -> Checked | None:
    """Per device that checked both versions, its accuracy under each at the densities it checked both at; None
    while fewer than MIN_DEVICES have."""
    pairs = []
    for device, mine in candidate.items():
        common = [d for d in mine if d in stable.get(device, {})]
        if common:
            pairs.append((statistics.fmean(100 * mine[d][1] / mine[d][0] for d in common),
                          statistics.fmean(100 * stable[device][d][1] / stable[device][d][0] for d in common)))
    if len(pairs) < MIN_DEVICES:
        return None
    return Checked(len(pairs), statistics.fmean(c for c, _ in pairs), statistics.fmean(s for _, s in pairs),
                   statistics.median(s - c for c, s in pairs))


def compare(candidate: dict[int, dict[float, Served]], stable: dict[int, dict[float, Served]],
            checks: tuple[DeviceChecks, DeviceChecks] | None = None) -> Verdict | None:
    """The verdict on the candidate's evidence against the stable version's (per device, per density), None while
    there is too little. Each side is judged by the median over its devices, so no single device — a broken one,
    or one that lies about what it served — can swing it. ``checks``: the devices' labelled checks of (the
    candidate, the stable version), decisive on their own when they show a regression."""
    checked = paired_checks(*checks) if checks else None
    if checked is not None and checked.median_drop_pt > MAX_ACCURACY_DROP_PT:
        return Verdict("", False, f"regressed on {checked.text()}")
    common = sorted({d for per in candidate.values() for d in per} & {d for per in stable.values() for d in per},
                    reverse=True)
    c_requests = sum(per[d].requests for per in candidate.values() for d in common if d in per)
    s_requests = sum(per[d].requests for per in stable.values() for d in common if d in per)
    if c_requests < MIN_REQUESTS or s_requests < MIN_REQUESTS or len(candidate) < MIN_DEVICES:
        return None
    reasons = []
    c_conf, s_conf = _median_confidence(candidate, common), _median_confidence(stable, common)
    if c_conf is not None and s_conf is not None and s_conf - c_conf > MAX_CONFIDENCE_DROP:
        reasons.append(f"confidence {c_conf:.3f} against the stable version's {s_conf:.3f}")
    for d in common:
        c_ms, s_ms = _median_ms(candidate, d), _median_ms(stable, d)
        if c_ms is not None and s_ms and c_ms / s_ms > MAX_SLOWDOWN:
            reasons.append(f"{c_ms:.2f} ms a request at density {d:g} against {s_ms:.2f} ms")
    evidence = f"{c_requests} requests on {len(candidate)} canary devices, {s_requests} on {len(stable)} stable ones"
    if checked is not None:
        evidence += f"; {checked.text()}"
    if reasons:
        return Verdict("", False, f"regressed on {evidence}: " + "; ".join(reasons))
    return Verdict("", True, f"no regression on {evidence}")


def _median_confidence(devices: dict[int, dict[float, Served]], densities: list[float]) -> float | None:
    """The median over devices of each one's mean top-class probability at ``densities``."""
    means = []
    for per in devices.values():
        used = [per[d] for d in densities if d in per and per[d].requests and per[d].confidence_sum is not None]
        if used:
            means.append(sum(u.confidence_sum for u in used) / sum(u.requests for u in used))  # type: ignore[misc]
    return statistics.median(means) if means else None


def _median_ms(devices: dict[int, dict[float, Served]], density: float) -> float | None:
    """The median over devices of each one's mean forward pass at ``density``."""
    means = [per[density].busy_ms / per[density].requests for per in devices.values()
             if density in per and per[density].requests]
    return statistics.median(means) if means else None


def judge(registry: Registry) -> Verdict | None:
    """Decide the candidate, if there is one with enough evidence; the decision is applied and returned."""
    stable, candidate, _ = registry.rollout()
    if candidate is None or stable is None:
        return None
    published = next(v.created_at for v in registry.list_versions() if v.version == candidate)
    evidence = registry.serving_evidence(since=published)
    checks = registry.version_checks(candidate), registry.version_checks(stable, devices_checking=candidate)
    verdict = compare(evidence.get(candidate, {}), evidence.get(stable, {}), checks)
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
