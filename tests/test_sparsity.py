"""Nested row-sparse masks: exact per-row counts, nesting, and density validation."""

import math

import pytest
import torch

from dress_model.layers import DressConv2d, DressLinear
from dress_model.sparsity import keep_count, order_to_rank, parse_densities, prefix_mask, row_order

DENSITIES = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (17, 33), (64, 9), (5, 1000), (2, 40000)])
def test_masks_keep_exactly_k_per_row_and_nest(rows: int, cols: int) -> None:
    torch.manual_seed(rows * cols)
    w = torch.randn(rows, cols)
    rank = order_to_rank(row_order(w))
    previous = torch.zeros(rows, cols, dtype=torch.bool)
    for d in DENSITIES:
        k = keep_count(d, cols)
        assert k == max(1, math.ceil(d * cols - 1e-9))
        mask = prefix_mask(rank, k)
        assert (mask.sum(1) == k).all(), f"every row must keep exactly {k} at density {d}"
        assert not (previous & ~mask).any(), "a sparser mask must be a subset of a denser one"
        previous = mask


def test_mask_keeps_the_largest_magnitudes_of_each_row() -> None:
    w = torch.tensor([[0.1, -5.0, 2.0, 0.0], [3.0, 0.2, -0.3, 4.0]])
    mask = prefix_mask(order_to_rank(row_order(w)), 2)
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_keep_count_is_exact_for_float_products() -> None:
    assert keep_count(0.3, 10) == 3  # 0.3*10 = 3.0000000000000004 in floating point
    assert keep_count(0.01, 10) == 1  # never an empty row
    assert keep_count(1.0, 7) == 7


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_layer_masks_nest_on_random_shapes(layer: str) -> None:
    torch.manual_seed(1)
    dens = (0.1, 0.25, 0.5, 1.0)
    m = DressLinear(37, 11, dens) if layer == "linear" else DressConv2d(5, 13, 3, dens)
    masks = [m.mask(d).reshape(m.rows, -1) for d in dens]
    for d, mask in zip(dens, masks):
        assert (mask.sum(1) == keep_count(d, m.cols)).all()
    for small, big in zip(masks, masks[1:]):
        assert ((small <= big)).all()


@pytest.mark.parametrize(
    "spec,expected",
    [("1,0.5,0.25,0.1", (0.1, 0.25, 0.5, 1.0)), ("0.1,0.5", (0.1, 0.5)), ([1.0], (1.0,))],
)
def test_parse_densities_accepts_sorted_lists(spec, expected) -> None:
    assert parse_densities(spec) == expected


@pytest.mark.parametrize(
    "spec,match",
    [
        ("0,0.5", r"\(0, 1\]"),
        ("1.5", r"\(0, 1\]"),
        ("-0.1", r"\(0, 1\]"),
        ("0.5,1,0.25", "sorted"),
        ("1,0.5,0.5", "repeat"),
        ("", "at least one"),
        ("a,b", "comma-separated"),
        ("nan", r"\(0, 1\]"),
    ],
)
def test_parse_densities_rejects_bad_lists(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_densities(spec)
