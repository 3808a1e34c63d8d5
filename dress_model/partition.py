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
    """A parsed --partition option: "iid", "dirichlet:ALPHA" or "labels:K" (``alpha`` holds K)."""

    kind: Literal["iid", "dirichlet", "labels"]
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "iid" and self.alpha is not None:
            raise ValueError("an iid partition takes no alpha")
        if self.kind == "dirichlet" and not (self.alpha is not None and math.isfinite(self.alpha)
                                             and self.alpha > 0):
            raise ValueError(f"dirichlet alpha must be a finite number > 0, got {self.alpha}")
        if self.kind == "labels" and not (self.alpha is not None and float(self.alpha).is_integer()
                                          and self.alpha >= 1):
            raise ValueError(f"labels per client must be an integer >= 1, got {self.alpha}")
        if self.kind not in ("iid", "dirichlet", "labels"):
            raise ValueError(f"unknown partition kind {self.kind!r}; expected 'iid', 'dirichlet' or 'labels'")

    def split(self, labels: np.ndarray | torch.Tensor, num_parts: int,
              seed: int) -> list[np.ndarray]:
        """Apply this scheme, so callers need not branch on the kind."""
        if self.kind == "iid":
            return iid_partition(len(labels), num_parts, seed)
        if self.kind == "labels":
            return label_shards_partition(labels, num_parts, int(self.alpha or 0), seed)
        return dirichlet_partition(labels, num_parts, self.alpha or 0.0, seed)

    def __str__(self) -> str:
        if self.kind == "labels":
            return f"labels:{int(self.alpha or 0)}"
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"


EXPECTED = "'iid', 'dirichlet:ALPHA' (e.g. 'dirichlet:0.5') or 'labels:K' (e.g. 'labels:2')"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse "iid", "dirichlet:ALPHA" (ALPHA a finite number > 0) or "labels:K" (K an integer >= 1)."""
    text = spec.strip().lower()
    if text == "iid":
        return PartitionSpec("iid")
    kind, sep, value = text.partition(":")
    if kind not in ("dirichlet", "labels") or not sep:
        raise ValueError(f"bad partition {spec!r}: expected {EXPECTED}")
    try:
        alpha = float(value)
    except ValueError:
        raise ValueError(f"bad partition {spec!r}: {value!r} is not a number") from None
    try:
        return PartitionSpec(kind, alpha)  # type: ignore[arg-type]
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


def label_shards_partition(labels: np.ndarray | torch.Tensor, num_parts: int, per_part: int,
                           seed: int) -> list[np.ndarray]:
    """HeteroFL's non-IID split: every class cut into equal shards, each part dealt ``per_part`` of them.

    As Flower's ``baselines/heterofl`` does it: ``per_part * num_parts / classes`` shards per class, the list of
    every shard's class shuffled and dealt ``per_part`` to a part, which takes one shard of each class dealt.
    A part dealt the same class twice takes two shards of it (HeteroFL drops the second, leaving its examples
    unused), and shards left over when the count does not divide go to a part holding their class, so the
    parts still cover the data."""
    y = _as_labels(labels)
    _check_parts(len(y), num_parts)
    classes = np.unique(y)
    per_class = math.ceil(per_part * num_parts / len(classes))
    if per_part < 1 or per_class > min(int((y == c).sum()) for c in classes):
        raise ValueError(f"cannot deal {per_part} label shards to each of {num_parts} parts: that cuts every "
                         f"class into {per_class} shards, more than its smallest class has examples")
    rng = np.random.default_rng(seed)
    shards = {int(c): np.array_split(rng.permutation(np.flatnonzero(y == c)), per_class) for c in classes}
    dealt = rng.permutation(np.repeat(classes, per_class))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    holders: dict[int, list[int]] = {}
    for i, cls in enumerate(dealt[: per_part * num_parts]):
        part = i // per_part
        parts[part].append(shards[int(cls)].pop(int(rng.integers(len(shards[int(cls)])))))
        holders.setdefault(int(cls), []).append(part)
    for cls, left in shards.items():  # shards the deal left over: to the parts that hold their class
        for j, shard in enumerate(left):
            owners = holders.get(cls) or [int(rng.integers(num_parts))]
            parts[owners[j % len(owners)]].append(shard)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]


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
