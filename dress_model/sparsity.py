"""Row-based nested sparsity: one per-row importance order, every density a prefix of it.

DRESS keeps, in every row of a layer's 2-D weight view [out, in*kh*kw], the same number of weights
k_d = ceil(d * cols). Ranking each row once and taking prefixes makes the masks nested by construction
(mask(d1) is a subset of mask(d2) for d1 < d2), which is what lets one stored copy serve every density.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

DEFAULT_DENSITIES: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
"""The subnets trained when nobody says otherwise: the one place this list is written."""


def format_densities(densities: Sequence[float]) -> str:
    """Densest first, as people write them on the command line: "1,0.5,0.25,0.1"."""
    return ",".join(f"{d:g}" for d in sorted(densities, reverse=True))


Importance = Callable[[torch.Tensor], torch.Tensor]
"""Maps a 2-D weight view [rows, cols] to scores of the same shape; higher means keep first."""


def magnitude(weight2d: torch.Tensor) -> torch.Tensor:
    """|w|: the default importance, cheap and what the paper's row-based sampling ranks by."""
    return weight2d.abs()


IMPORTANCE: dict[str, Importance] = {"magnitude": magnitude}


def get_importance(name: str) -> Importance:
    try:
        return IMPORTANCE[name]
    except KeyError:
        raise ValueError(f"unknown importance {name!r}; expected one of {sorted(IMPORTANCE)}") from None


def parse_densities(spec: str | Sequence[float]) -> tuple[float, ...]:
    """Validate a density list and return it ascending.

    Accepts "1,0.5,0.25" or a sequence, written either ascending or descending; rejects values outside
    (0, 1], duplicates and unsorted lists (an unsorted list is almost always a typo).
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"densities must be comma-separated numbers in (0, 1], got {spec!r}") from None
    else:
        values = [float(v) for v in spec]
    if not values:
        raise ValueError(f"densities must list at least one value in (0, 1], e.g. {format_densities(DEFAULT_DENSITIES)}")
    bad = [v for v in values if not (0.0 < v <= 1.0) or math.isnan(v)]
    if bad:
        raise ValueError(f"every density must be in (0, 1]; got {bad} in {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"densities must not repeat; got {values}")
    ascending = sorted(values)
    if values != ascending and values != ascending[::-1]:
        raise ValueError(f"densities must be sorted (ascending or descending); got {values}")
    return tuple(ascending)


DENSITY_TOLERANCE = 1e-9  # a density written as decimal text by a person may differ from the list's in its last bit


def level_of(densities: Sequence[float], density: float) -> int:
    """The level of ``density``: its index in ``densities`` (ascending), which is how a density travels between
    processes. The one place densities are compared with a tolerance: a number typed by a person or read from a
    file may miss the list's float in its last bit. ValueError when it is none of them."""
    for level, d in enumerate(densities):
        if abs(d - density) <= DENSITY_TOLERANCE:
            return level
    raise ValueError(f"density {density:g} is not one of {format_densities(densities)}")


def check_level(densities: Sequence[float], level: int) -> int:
    """``level`` itself when it indexes ``densities``; ValueError (naming the list) for anything else: a level
    comes from another process."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(densities):
        raise ValueError(f"level must be an integer in [0, {len(densities) - 1}] (densities "
                         f"{format_densities(densities)}, sparsest first), got {level!r}")
    return level


def density_at(densities: Sequence[float], level: int) -> float:
    """The density a level from another process stands for; ValueError (``check_level``'s) for one that indexes
    nothing."""
    return densities[check_level(densities, level)]


def keep_count(density: float, cols: int) -> int:
    """k_d = ceil(d * cols), at least 1; the epsilon stops 0.3*10 = 3.0000000000000004 from becoming 4."""
    return max(1, min(cols, math.ceil(density * cols - 1e-9)))


def row_order(weight2d: torch.Tensor, importance: Importance = magnitude) -> torch.Tensor:
    """Per-row column order, most important first (int64 [rows, cols]); stable so ties are deterministic."""
    scores = importance(weight2d.detach())
    if scores.shape != weight2d.shape:
        raise ValueError(f"importance returned shape {tuple(scores.shape)}, expected {tuple(weight2d.shape)}")
    return torch.argsort(scores, dim=1, descending=True, stable=True)


def order_to_rank(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation per row: rank[r, c] is where column c sits in row r's order."""
    rank = torch.empty_like(order)
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank.scatter_(1, order, arange)
    return rank


def prefix_mask(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the k most important weights of every row."""
    return rank < k
