"""Packed layers for the kernel tests, made by production's packer (dress_model.packed): one rounding rule."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from dress_model.kernels import best_kernel_isa, set_kernel_isa
from dress_model.packed_format import band_table, pack_rows, prefix_lengths

_ORDER = ["generic", "avx2", "avx512"]
ISAS = _ORDER[: _ORDER.index(best_kernel_isa()) + 1]  # every ISA variant this CPU can run


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a kernel test once per compiled ISA variant (the dispatcher normally picks the best); a test module
    imports it, so the kernel tests need no conftest (they also run alone on an aarch64 device root)."""
    set_kernel_isa(request.param)
    yield request.param
    set_kernel_isa()


def pack_layer(
    weight: torch.Tensor,
    order: torch.Tensor,
    densities: Sequence[float],
    *,
    sort: bool = True,
    index_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, bands) of ``weight`` ranked by ``order``, one band per density (ascending).

    ``sort=False`` shuffles every row's pairs inside each band (the kernels accept any order there);
    ``index_dtype`` overrides the packer's choice (int16 up to 32767 columns)."""
    rows = weight.shape[0]
    ks = prefix_lengths(tuple(densities), weight.shape[1])
    values, indices = pack_rows(weight, order, ks)
    bands = band_table(ks, rows)
    if not sort:
        values, indices = values.clone(), indices.clone()
        for offset, width in bands.tolist():
            for r in range(rows):
                span = slice(offset + r * width, offset + (r + 1) * width)
                p = torch.randperm(width, generator=generator)
                values[span], indices[span] = values[span][p].clone(), indices[span][p].clone()
    if index_dtype is not None:
        indices = indices.to(index_dtype)
    return values, indices, bands
