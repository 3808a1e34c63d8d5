"""Deterministic client partitions for federated runs.

A partition is a list of disjoint, sorted index arrays that together cover the
dataset. Everything is driven by an explicit seed so that a simulated fleet and
its repeat run see exactly the same client data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

MAX_DIRICHLET_DRAWS = 200
K = TypeVar("K")
PROFILE_LEAN = 0.8  # a `profile` partition's default: this share of a device's examples is of its profile's classes


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed --partition option: "iid", "dirichlet:ALPHA", "labels:K" or "profile[:LEAN]" (``alpha`` holds K
    or LEAN)."""

    kind: Literal["iid", "dirichlet", "labels", "profile"]
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
        if self.kind == "profile" and not (self.alpha is not None and 0 <= self.alpha <= 1):
            raise ValueError(f"a profile partition's lean must be a number in [0, 1], got {self.alpha}")
        if self.kind not in ("iid", "dirichlet", "labels", "profile"):
            raise ValueError(f"unknown partition kind {self.kind!r}; expected 'iid', 'dirichlet', 'labels' or "
                             "'profile'")

    def split(self, labels: np.ndarray | torch.Tensor, num_parts: int,
              seed: int, groups: Sequence[str] | None = None) -> list[np.ndarray]:
        """Apply this scheme, so callers need not branch on the kind; ``groups`` (each part's device profile)
        is what a profile partition leans by, and only it."""
        if self.kind == "profile":
            if groups is None or len(groups) != num_parts:
                raise ValueError(f"a profile partition needs each of the {num_parts} parts' profile, got "
                                 f"{'none' if groups is None else len(groups)}")
            return profile_partition(labels, groups, float(self.alpha or 0.0), seed)
        if self.kind == "iid":
            return iid_partition(len(labels), num_parts, seed)
        if self.kind == "labels":
            return label_shards_partition(labels, num_parts, int(self.alpha or 0), seed)
        return dirichlet_partition(labels, num_parts, self.alpha or 0.0, seed)

    def __str__(self) -> str:
        if self.kind == "labels":
            return f"labels:{int(self.alpha or 0)}"
        if self.kind == "profile":
            return "profile" if self.alpha == PROFILE_LEAN else f"profile:{self.alpha:g}"
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"


EXPECTED = ("'iid', 'dirichlet:ALPHA' (e.g. 'dirichlet:0.5'), 'labels:K' (e.g. 'labels:2') or 'profile[:LEAN]' "
            f"(e.g. 'profile', lean {PROFILE_LEAN:g})")


def parse_partition(spec: str) -> PartitionSpec:
    """Parse "iid", "dirichlet:ALPHA" (ALPHA a finite number > 0), "labels:K" (K an integer >= 1) or
    "profile[:LEAN]" (LEAN in [0, 1], default PROFILE_LEAN)."""
    text = spec.strip().lower()
    if text == "iid":
        return PartitionSpec("iid")
    if text == "profile":
        return PartitionSpec("profile", PROFILE_LEAN)
    kind, sep, value = text.partition(":")
    if kind not in ("dirichlet", "labels", "profile") or not sep:
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


def largest_remainders(exact: Mapping[K, float], total: int) -> dict[K, int]:
    """Whole counts summing to ``total`` from ``exact`` shares of it: each share rounded down, then one more to
    those with the largest remainders (ties in ``exact``'s order)."""
    counts = {key: int(value) for key, value in exact.items()}
    for key in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def profile_partition(labels: np.ndarray | torch.Tensor, groups: Sequence[str], lean: float,
                      seed: int) -> list[np.ndarray]:
    """Device-correlated parts: part i belongs to group ``groups[i]`` (its device's profile), and each group
    leans to classes of its own, so what one kind of device sees must reach the others through the model.

    The classes are dealt to the groups in proportion to how many parts each holds (largest remainders, in a
    seeded order), so a group's classes carry about as many examples per part as another's; a part then wants
    ``lean`` of its examples from its group's classes and the rest from every class alike (a group dealt no
    class wants every class alike). Each class is cut among the parts in proportion to what they want of it:
    the parts are disjoint and cover the data."""
    y = _as_labels(labels)
    num_parts = len(groups)
    _check_parts(len(y), num_parts)
    if not 0 <= lean <= 1:
        raise ValueError(f"lean must be in [0, 1], got {lean}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    names = sorted(set(groups))
    dealt = largest_remainders({g: len(classes) * list(groups).count(g) / num_parts for g in names}, len(classes))
    order, owned, start = rng.permutation(len(classes)), {}, 0
    for g in names:
        owned[g], start = order[start:start + dealt[g]], start + dealt[g]
    want = np.full((num_parts, len(classes)), (1 - lean) / len(classes))
    for i, g in enumerate(groups):
        if len(owned[g]):
            want[i, owned[g]] += lean / len(owned[g])
        else:
            want[i] += lean / len(classes)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for c, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == cls))
        cuts = np.round(np.cumsum(want[:, c])[:-1] / want[:, c].sum() * len(members)).astype(np.int64)
        for bucket, chunk in zip(buckets, np.split(members, cuts)):
            bucket.append(chunk)
    return [np.sort(np.concatenate(bucket)) for bucket in buckets]


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
