"""Checks a device's reply must pass before it counts: nothing a remote party sends is trusted unchecked.

A reply holds the tensors the device trained and how many examples it trained on. It counts only if it has
exactly the tensors it was sent, with the same shapes and dtypes, an example count between 1 and what the server
allows a device per round, and is a model honest training could have made of what it was sent (``implausible``:
every value finite, BN statistics in range, weights moved by at most a few times their own norm) — a rule that
needs no other reply, so it holds in a round of one or two. With three replies or more, an update (reply − sent)
must also not be far larger than the round's typical one, per weight it moves (``update_size``): a capable
device trains a subnet ten times the size of a weak one's, and its honest update is that much longer. A reply
that fails is dropped with its reason (recorded with the round); no reply can raise out of the aggregation and
end the ServerApp. The round's aggregate and the model the publisher publishes are judged by the same
``implausible`` against the model they came from.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

NORM_FACTOR = 10.0
"""An update whose size (``update_size``) exceeds this many times the round's median is an outlier (scaled or
poisoned)."""
MIN_FOR_MEDIAN = 3  # fewer replies than this give no median worth comparing with
RELATIVE_BOUND = 5.0
"""An update may move the learned tensors it covers by at most this many times their norm. Honest replies of real
devices measured at most 0.82 at the default lr 0.05 (round 1 from the initial model, sparsest tier, a whole
60,000-image epoch; every later round moved less), 2.8 at ten times it and 3.4 at twenty (round 1, 2,000 images,
DRESS and every peer, the small CNN; ResNet-8 at most 1.2). A reply ×1000 moves them further whenever its honest
update moved them by over 0.5% (the least measured moved them by 3.4%: round 3 at the default lr); a reply
reversed ×100, whenever by over 5%."""
STATISTICS_BOUND = 100.0
"""BN running statistics may describe activations at most this many times the size of the model's they are
judged against: |running_mean| ≤ bound × s and 0 ≤ running_var ≤ (bound × s)², s² the layer's largest
running_var or running_mean² there, at least 1 (a fresh BN's). Honest replies and recalibrated aggregates
measured at most 5 s at the default lr and 27 s at ten times it (round 1, from a fresh model's s = 1); the
aggregate of a reply ×1000 had a running_var of 3·10²⁹. A variance of 0 is a channel constant over the data
(BN adds its epsilon); a negative one is no variance at all."""
STATISTICS = ("running_mean", "running_var")  # BN's: measured on data rather than learned, checked on their own


class RejectedUpdate(ValueError):
    """A reply that does not count; the message says why, ``kind`` which of REFUSALS (a metric's label)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


REFUSALS = ("malformed", "examples", "tensors", "implausible", "outlier")
"""Why a reply did not count, in kinds: unreadable, a wrong example count, tensors other than those sent, values
honest training cannot make, an update far beyond the round's others."""


@dataclass(frozen=True)
class Expected:
    """What a device was sent, as its reply must mirror it."""

    tensors: Mapping[str, torch.Tensor]
    max_examples: int


def check_reply(expected: Expected, tensors: Mapping[str, torch.Tensor], num_examples: object) -> float:
    """The update's size (``update_size``) if the reply is well formed and plausible; RejectedUpdate else."""
    if (isinstance(num_examples, bool) or not isinstance(num_examples, int | float) or not math.isfinite(num_examples)
            or num_examples != int(num_examples)):
        raise RejectedUpdate(f"num-examples must be an integer, got {num_examples!r}", "examples")
    if not 1 <= int(num_examples) <= expected.max_examples:
        raise RejectedUpdate(f"num-examples {int(num_examples)} outside [1, {expected.max_examples}]", "examples")
    missing, extra = sorted(set(expected.tensors) - set(tensors)), sorted(set(tensors) - set(expected.tensors))
    if missing or extra:
        raise RejectedUpdate(f"tensors differ from those sent: missing {missing[:3]}, unexpected {extra[:3]}",
                             "tensors")
    for key, sent in expected.tensors.items():
        theirs = tensors[key]
        if theirs.dtype != sent.dtype or theirs.shape != sent.shape:
            raise RejectedUpdate(f"{key}: {theirs.dtype} {list(theirs.shape)}, sent {sent.dtype} {list(sent.shape)}",
                                 "tensors")
    if reason := implausible(expected.tensors, tensors):
        raise RejectedUpdate(reason, "implausible")
    return update_size(expected.tensors, tensors)


def update_size(sent: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> float:
    """Root mean square of reply − sent over the learned tensors (floating, not BN statistics): how far the update
    moved each weight. Honest devices of different tiers move their weights alike, but a subnet ten times the size
    makes an update about three times as long: compared by L2 norm, the capable devices' honest updates were
    refused as outliers (issue 25's capacity fleet: up to 12 % of DRESS's d=1 updates). A scaled reply scales
    this size as it scaled the norm."""
    moved, _, count = learned_change(sent, tensors)
    return math.sqrt(moved / count) if count else 0.0


def implausible(reference: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` cannot be what honest training made of ``reference`` (what a device was sent, the model a
    round started from, the last published one), judged against it alone; None if they can be. Where the reference
    lacks a tensor, BN statistics are judged as against a fresh model's and weights are not compared."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(value.isfinite().all()):
            return f"{key}: not finite"
    for key, value in tensors.items():
        if key.endswith(STATISTICS) and (reason := statistics_out_of_range(reference, key, value)):
            return f"{key}: {reason}"
    change = relative_change(reference, tensors)
    if change > RELATIVE_BOUND:
        return f"update norm {change:.3g}× the norm of the weights it moves, over {RELATIVE_BOUND:g}×"
    return None


def statistics_out_of_range(reference: Mapping[str, torch.Tensor], key: str, value: torch.Tensor) -> str | None:
    """Why a BN running mean or variance is out of STATISTICS_BOUND × its layer's scale in ``reference``, or None."""
    if not value.numel():
        return None
    scale = activation_scale(reference, key.rpartition(".")[0])
    bound = STATISTICS_BOUND * scale
    if key.endswith("running_var"):
        low, high = float(value.min()), float(value.max())
        if low < 0:
            return f"negative variance {low:.3g}"
        if high > bound ** 2:
            return f"variance {high:.3g} over {bound ** 2:.3g} ({STATISTICS_BOUND:g}² × the layer's {scale ** 2:.3g})"
        return None
    largest = float(value.abs().max())
    if largest > bound:
        return f"mean {largest:.3g} over {bound:.3g} ({STATISTICS_BOUND:g} × the layer's {scale:.3g})"
    return None


def activation_scale(reference: Mapping[str, torch.Tensor], layer: str) -> float:
    """The size of what a BN ``layer`` of ``reference`` normalises: its largest running std or |mean|, at least 1
    (a fresh BN's)."""
    squares = [1.0]
    for name, power in (("running_var", 1), ("running_mean", 2)):
        statistic = reference.get(f"{layer}.{name}")
        if statistic is not None and statistic.numel():
            squares.append(float(statistic.double().pow(power).max()))
    return math.sqrt(max(squares))


def relative_change(reference: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> float:
    """‖tensors − reference‖ / ‖reference‖ over the learned (floating, not BN statistics) tensors both hold; 0 when
    the reference holds none."""
    moved, size, _ = learned_change(reference, tensors)
    return math.sqrt(moved / size) if size > 0 else 0.0


def learned_change(reference: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
                   ) -> tuple[float, float, int]:
    """Over the learned tensors both hold (floating, not BN statistics): ‖tensors − reference‖², ‖reference‖² and
    how many values, in float64 (float32 values squared there cannot overflow)."""
    moved = size = 0.0
    count = 0
    for key, value in tensors.items():
        before = reference.get(key)
        if before is None or not value.is_floating_point() or key.endswith(STATISTICS):
            continue
        moved += float((value.double() - before.double()).pow(2).sum())
        size += float(before.double().pow(2).sum())
        count += before.numel()
    return moved, size, count


def size_outliers(sizes: Mapping[int, float], factor: float = NORM_FACTOR) -> dict[int, str]:
    """Replies whose update size is over ``factor`` × the round's median, with the reason; none below 3 replies."""
    if len(sizes) < MIN_FOR_MEDIAN:
        return {}
    median = statistics.median(sizes.values())
    limit = factor * median
    return {key: f"update size {size:.3g} per weight over {factor:g}× the round's median {median:.3g}"
            for key, size in sizes.items() if median > 0 and size > limit}
