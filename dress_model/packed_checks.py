"""Checks of a packed file that comes from someone else, before and while anything is built for it.

Before building anything the loader checks that the header's tensors are the ones its architecture needs, that
the file carries their bytes, and that loading them takes at most ``MAX_LOAD_BYTES`` (``load_bytes``), so a
small file cannot make it allocate a large model; then, layer by layer, shapes, dtypes, index ranges and that a
row names each column once. Any inconsistency is a ``PackedFormatError``, never a crash or garbage.
"""

from __future__ import annotations

import json
import math

import torch

from dress_model import kernels
from dress_model.models import DressModel
from dress_model.packed_format import (
    PackedFormatError,
    Stored,
    band_columns,
    index_bits,
    index_dtype_for,
    packed_index_bytes,
    prefix_lengths,
    stored_index_count,
    top_band_indices,
)
from dress_model.packed_layer import PackedSparse


def load_bytes(net: DressModel) -> int:
    """Tensor bytes loading a file of ``net``'s architecture holds at once, at most (``net`` may be on the meta
    device: nothing is allocated to count). ``PackedModel`` builds ``net`` and the packed model beside it, then
    frees ``net`` and reads the file's tensors, as large as the packed model's; finalizing adds each full top
    band's dense layer. Meanwhile, a layer at a time, ranking (building) or checking (loading) its columns sorts
    them: int64 columns, their sorted copy and its order."""
    built = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    packed, widest = built, 0
    for _, layer in net.sparse_layers():
        k = prefix_lengths(layer.densities, layer.cols)[-1]
        dense = layer.rows * layer.cols
        packed += layer.rows * k * (4 + index_dtype_for(layer.cols).itemsize)  # values, indices
        packed -= dense * (layer.weight.element_size() + layer.order.element_size())  # replaced by them
        packed += len(layer.densities) * 2 * 8  # the band table, int64 [n, 2]
        if k == layer.cols:
            packed += dense * 4  # the full top band's dense layer
        widest = max(widest, dense)
    return built + 2 * packed + 3 * 8 * widest


def stored_tensors(net: DressModel) -> Stored:
    """Each tensor a packed file of ``net``'s architecture holds: its shape, and the fewest bytes an element of
    it travels in (floats as float16, indices bit-packed into bytes, anything else at least a byte)."""
    want = {key: (tuple(t.shape), 2 if t.is_floating_point() else 1) for key, t in net.state_dict().items()}
    for name, layer in net.sparse_layers():
        del want[f"{name}.weight"], want[f"{name}.order"]
        ks = prefix_lengths(layer.densities, layer.cols)
        want[f"{name}.values"] = ((layer.rows * ks[-1],), 2)
        want[f"{name}.indices"] = ((packed_index_bytes(stored_index_count(ks, layer.rows, layer.cols),
                                                       index_bits(layer.cols)),), 1)
    return want


def check_declared_shapes(source: str, want: Stored, data: bytes) -> None:
    """Every tensor the architecture needs is in the file with exactly its shape, and nothing else is; the file's
    shapes come from its safetensors header."""
    try:
        n = int.from_bytes(data[:8], "little")
        table = json.loads(data[8 : 8 + n])
        have = {key: tuple(int(x) for x in entry["shape"]) for key, entry in table.items() if key != "__metadata__"}
    except (ValueError, KeyError, TypeError) as e:
        raise PackedFormatError(f"{source}: unreadable tensor table: {e}") from None
    if missing := sorted(set(want) - set(have)):
        raise PackedFormatError(f"{source}: lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := sorted(set(have) - set(want)):
        raise PackedFormatError(f"{source}: holds tensors the architecture has no place for: {extra[:5]}")
    for key, (shape, _) in want.items():
        if have[key] != shape:
            raise PackedFormatError(f"{source}: {key} has shape {list(have[key])}, the declared architecture "
                                    f"needs {list(shape)}")


def check_declared_size(source: str, net: DressModel, want: Stored, data: bytes, max_bytes: int) -> None:
    """The file holds the bytes its declared tensors take, and loading them takes at most ``max_bytes``: a
    small file cannot make the loader build a large model."""
    least = sum(math.prod(shape) * size for shape, size in want.values())
    carried = len(data) - 8 - int.from_bytes(data[:8], "little")
    if least > carried:
        raise PackedFormatError(f"{source}: its header declares tensors of at least {least:,} bytes, the file "
                                f"carries {carried:,}: it describes a larger model than it holds")
    if (needed := load_bytes(net)) > max_bytes:
        arch = net.arch
        raise PackedFormatError(f"{source}: loading its architecture ({arch.name}, width {arch.width}, "
                                f"{arch.num_classes} classes, {arch.image_size}px images) takes {needed:,} bytes "
                                f"of tensors, more than the {max_bytes:,} allowed; a caller that trusts it passes "
                                "a larger max_bytes")


def with_top_band(source: str, name: str, layer: PackedSparse, head: torch.Tensor) -> torch.Tensor:
    """A full-top layer's stored indices (its lower bands) checked, then completed by the top band's."""
    known = checked_columns(source, name, head, layer.bands[:-1], layer.rows, layer.cols)
    top = top_band_indices(known, layer.rows, layer.cols).to(head.dtype).reshape(-1)
    return torch.cat([head, top])


def check_layer(source: str, name: str, layer: PackedSparse, tensors: dict[str, torch.Tensor]) -> None:
    """Shapes, dtypes, index range and per-row uniqueness: a bad file must fail here, not compute garbage."""
    values, indices = tensors.get(f"{name}.values"), tensors.get(f"{name}.indices")
    if values is None or indices is None:
        raise PackedFormatError(f"{source}: layer {name} lacks its values/indices tensors")
    n = layer.entries(len(layer.densities) - 1)
    want_idx = index_dtype_for(layer.cols)
    if values.dtype != torch.float32 or values.shape != (n,):
        raise PackedFormatError(f"{source}: {name}.values must be float32 [{n}], got {values.dtype} {list(values.shape)}")
    if indices.dtype not in (torch.int16, torch.int32) or indices.shape != (n,):
        raise PackedFormatError(f"{source}: {name}.indices must be int16/int32 [{n}], got {indices.dtype} {list(indices.shape)}")
    if indices.dtype == torch.int16 and want_idx == torch.int32:
        raise PackedFormatError(f"{source}: {name} has {layer.cols} columns, too many for int16 indices")
    checked_columns(source, name, indices, layer.bands, layer.rows, layer.cols)


def checked_columns(source: str, name: str, indices: torch.Tensor, bands: torch.Tensor, rows: int,
                     cols: int) -> torch.Tensor:
    """``band_columns`` of indices that stay inside the buffer and [0, cols) and name each column of a row
    at most once; PackedFormatError otherwise."""
    try:
        kernels.validate_indices(indices, bands, rows, cols)
    except ValueError as e:
        raise PackedFormatError(f"{source}: {name}: {e}") from None
    columns = band_columns(indices, bands, rows)
    ordered = columns.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise PackedFormatError(f"{source}: {name} repeats a column within a row (each weight must appear once)")
    return columns
