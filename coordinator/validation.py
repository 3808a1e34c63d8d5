"""Checks a device's reply must pass before it counts: nothing a remote party sends is trusted unchecked.

A reply holds the tensors the device trained and how many examples it trained on. It counts only if it has
exactly the tensors it was sent, with the same shapes and dtypes, every value finite, an example count between
1 and what the server allows a device per round, and an update (reply − sent) not far larger than the round's
typical one. A reply that fails is dropped with its reason (recorded with the round); no reply can raise out of
the aggregation and end the ServerApp.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

NORM_FACTOR = 10.0
"""An update whose norm exceeds this many times the round's median is an outlier (scaled or poisoned)."""
MIN_FOR_MEDIAN = 3  # fewer replies than this give no median worth comparing with


class RejectedUpdate(ValueError):
    """A reply that does not count; the message says why."""


@dataclass(frozen=True)
class Expected:
    """What a device was sent, as its reply must mirror it."""

    tensors: Mapping[str, torch.Tensor]
    max_examples: int


def check_reply(expected: Expected, tensors: Mapping[str, torch.Tensor], num_examples: object) -> float:
    """The update's L2 norm (reply − sent over floating tensors) if the reply is well formed; RejectedUpdate else."""
    if (isinstance(num_examples, bool) or not isinstance(num_examples, int | float) or not math.isfinite(num_examples)
            or num_examples != int(num_examples)):
        raise RejectedUpdate(f"num-examples must be an integer, got {num_examples!r}")
    if not 1 <= int(num_examples) <= expected.max_examples:
        raise RejectedUpdate(f"num-examples {int(num_examples)} outside [1, {expected.max_examples}]")
    missing, extra = sorted(set(expected.tensors) - set(tensors)), sorted(set(tensors) - set(expected.tensors))
    if missing or extra:
        raise RejectedUpdate(f"tensors differ from those sent: missing {missing[:3]}, unexpected {extra[:3]}")
    squared = 0.0
    for key, sent in expected.tensors.items():
        theirs = tensors[key]
        if theirs.dtype != sent.dtype or theirs.shape != sent.shape:
            raise RejectedUpdate(f"{key}: {theirs.dtype} {list(theirs.shape)}, sent {sent.dtype} {list(sent.shape)}")
        if theirs.is_floating_point():
            if not bool(torch.isfinite(theirs).all()):
                raise RejectedUpdate(f"{key}: not finite")
            squared += float((theirs.double() - sent.double()).pow(2).sum())
    return math.sqrt(squared)  # finite: float32 values squared in float64 cannot overflow


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Every floating value finite: what a model must be to be kept (the strategy) or published (the publisher)."""
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


def norm_outliers(norms: Mapping[int, float], factor: float = NORM_FACTOR) -> dict[int, str]:
    """Replies whose update norm is over ``factor`` × the round's median, with the reason; none below 3 replies."""
    if len(norms) < MIN_FOR_MEDIAN:
        return {}
    median = statistics.median(norms.values())
    limit = factor * median
    return {key: f"update norm {norm:.3g} over {factor:g}× the round's median {median:.3g}"
            for key, norm in norms.items() if median > 0 and norm > limit}
