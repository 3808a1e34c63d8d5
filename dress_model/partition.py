"""Deterministic client partitions for federated runs.

A partition is a list of disjoint, sorted index arrays that together cover the
dataset. Everything is driven by an explicit seed so that a simulated fleet and
its repeat run see exactly the same client data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

MAX_DIRICHLET_DRAWS = 200


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed --partition option: "iid" or "dirichlet:ALPHA"."""

    kind: Literal["iid", "dirichlet"]
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "iid" and self.alpha is not None:
            raise ValueError("an iid partition takes no alpha")
        if self.kind == "dirichlet" and not (self.alpha is not None and math.isfinite(self.alpha)
                                             and self.alpha > 0):
            raise ValueError(f"dirichlet alpha must be a finite number > 0, got {self.alpha}")
        if self.kind not in ("iid", "dirichlet"):
            raise ValueError(f"unknown partition kind {self.kind!r}; expected 'iid' or 'dirichlet'")

    def split(self, labels: np.ndarray | torch.Tensor, num_parts: int,
              seed: int) -> list[np.ndarray]:
        """Apply this scheme, so callers need not branch on the kind."""
        if self.kind == "iid":
            return iid_partition(len(labels), num_parts, seed)
        return dirichlet_partition(labels, num_parts, self.alpha or 0.0, seed)

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse "iid" or "dirichlet:ALPHA" (ALPHA a finite number > 0)."""
    text = spec.strip().lower()
    if text == "iid":
        return PartitionSpec("iid")
    kind, sep, value = text.partition(":")
    if kind != "dirichlet" or not sep:
        raise ValueError(f"bad partition {spec!r}: expected 'iid' or 'dirichlet:ALPHA', "
                         "e.g. 'dirichlet:0.5'")
    try:
        alpha = float(value)
    except ValueError:
        raise ValueError(f"bad partition {spec!r}: ALPHA {value!r} is not a number") from None
    try:
        return PartitionSpec("dirichlet", alpha)
    except ValueError as exc:
        raise ValueError(f"bad partition {spec!r}: {exc}") from None


def iid_partition(num_items: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """Uniformly random, near-equal parts (sizes differ by at most one)."""
    _check_parts(num_items, num_parts)
    order = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(part) for part in np.array_split(order, num_parts)]


def dirichlet_partition(labels: np.ndarray | torch.Tensor, num_parts: int, alpha: float,
                        seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed parts: each class is spread over parts by a Dirichlet(alpha) draw.

    Small alpha gives each client few classes (strongly non-IID). Draws that leave
    a part with fewer than min_size items are redrawn, up to MAX_DIRICHLET_DRAWS.
    """
    y = _as_labels(labels)
    _check_parts(len(y), num_parts)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_parts > len(y):
        raise ValueError(f"cannot give {num_parts} parts at least {min_size} items each "
                         f"from only {len(y)} items")
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(y, num_parts, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave all {num_parts} parts >= "
                     f"{min_size} items in {MAX_DIRICHLET_DRAWS} tries; raise alpha, "
                     "lower min_size or use fewer parts")


def _dirichlet_draw(y: np.ndarray, num_parts: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        shares = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for bucket, chunk in zip(buckets, np.split(members, cuts)):
            bucket.append(chunk)
    return [np.sort(np.concatenate(bucket)) for bucket in buckets]


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y


def _check_parts(num_items: int, num_parts: int) -> None:
    if not 0 < num_parts <= num_items:
        raise ValueError(f"num_parts must be in [1, {num_items}] (the number of items), "
                         f"got {num_parts}")
