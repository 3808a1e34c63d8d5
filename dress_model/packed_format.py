"""The packed row-sparse format: one stored copy of every density's weights, and the tensor helpers that make it.

Per sparse layer, with the model's densities d_1 < ... < d_n (up to a chosen maximum) and
k_i = ceil(d_i * cols), *band* i holds every row's importance-ranked entries k_{i-1}..k_i-1 as a
[rows, k_i - k_{i-1}] block. ``values`` (float32) and ``indices`` (int16, or int32 for rows longer than
32767; the column in the layer's 2-D weight view) concatenate the blocks, so density d_i is the first i
bands: a contiguous prefix of both buffers. Switching density picks how many bands the kernel reads;
nothing is copied or allocated. Inside a band, indices are sorted ascending for input locality.

The same file is what is stored on a device, shipped by the coordinator and executed by the kernel:
safetensors tensors + a JSON header (format, version, architecture, densities); BN statistics per density
travel as tensors and are folded into the kernel's per-row scale/shift at load time. When a layer's top band
completes every row (k_n = cols), the file omits that band's indices — they are the columns the earlier bands
miss, ascending, and the loader rebuilds them. Floats may travel as float16 (half the bytes on the wire,
computed in float32); stored indices travel bit-packed, ``index_bits(cols)`` bits each (10 for a 576-column
row instead of int16's 16), and are unpacked to the kernels' int16/int32 at load.
"""

from __future__ import annotations

import numpy as np
import torch

from dress_model.sparsity import keep_count

FORMAT = "dress-packed"
VERSION = 3  # 2: a full top band travels without indices, floats may be float16; 3: indices bit-packed
INT16_MAX_COLS = 32767  # the widest row int16 column indices address; wider layers store int32
MAX_LOAD_BYTES = 1 << 30
"""The most tensor bytes loading a packed file may take (``load_bytes`` of its architecture) unless the caller
passes ``max_bytes``: a sanity bound, not a device limit, about a hundred times what the models this project
ships take (cnn, resnet8, resnet20 at width 16: about 10 MB), so a file declaring a far bigger model is refused
before anything is built for it."""
UNPACK_CHUNK = 1 << 16  # indices unpacked at a time: a multiple of 8, so every chunk starts on a byte
Stored = dict[str, tuple[tuple[int, ...], int]]  # tensor name -> (shape, fewest bytes an element travels in)


def index_dtype_for(cols: int) -> torch.dtype:
    """The index type a layer of ``cols`` columns is stored with: the one rule, for packer and loader alike."""
    return torch.int16 if cols <= INT16_MAX_COLS else torch.int32


class PackedFormatError(ValueError):
    """A packed file is missing, corrupt, or does not describe a valid packed model."""


def prefix_lengths(densities: tuple[float, ...], cols: int) -> list[int]:
    return [keep_count(d, cols) for d in densities]


def band_table(ks: list[int], rows: int) -> torch.Tensor:
    """int64 [n, 2] of (offset, width): band i spans entries k_{i-1}..k_i-1 of every row."""
    table, offset, previous = [], 0, 0
    for k in ks:
        table.append((offset, k - previous))
        offset += rows * (k - previous)
        previous = k
    return torch.tensor(table, dtype=torch.int64).reshape(-1, 2)


def pack_rows(weight2d: torch.Tensor, order: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded (values, indices) of a [rows, cols] weight ranked by ``order``; see the module docstring."""
    index_dtype = index_dtype_for(weight2d.shape[1])
    values, indices, previous = [], [], 0
    for k in ks:
        idx = order[:, previous:k].long().sort(dim=1).values
        values.append(weight2d.gather(1, idx).reshape(-1))
        indices.append(idx.reshape(-1))
        previous = k
    return torch.cat(values).float().contiguous(), torch.cat(indices).to(index_dtype).contiguous()


def stored_index_count(ks: list[int], rows: int, cols: int) -> int:
    """Indices a file holds for a layer of prefix lengths ``ks``: all, except a top band that completes every
    row (k_n = cols), whose indices the loader rebuilds (``top_band_indices``)."""
    if ks[-1] != cols:
        return rows * ks[-1]
    return rows * ks[-2] if len(ks) > 1 else 0


def index_bits(cols: int) -> int:
    """Bits a stored column index of a ``cols``-column row takes: enough for ``cols - 1``."""
    return max(1, (cols - 1).bit_length())


def packed_index_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_index_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [packed_index_bytes]: each index's ``bits`` low bits, little-endian, one after the other."""
    a = indices.numpy().astype(np.uint32)
    bit_matrix = ((a[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_index_bits(data: torch.Tensor, count: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``pack_index_bits`` undone: ``count`` indices as ``dtype`` (range checks are the loader's), a chunk at a
    time: the bit matrix takes 4 * ``bits`` bytes an index, far more than the indices themselves."""
    packed, out, weights = data.numpy(), torch.empty(count, dtype=dtype), np.arange(bits, dtype=np.int32)
    for start in range(0, count, UNPACK_CHUNK):
        n = min(UNPACK_CHUNK, count - start)
        bit_matrix = np.unpackbits(packed[start * bits // 8 :], count=n * bits, bitorder="little").reshape(n, bits)
        values = (bit_matrix.astype(np.int32) << weights).sum(axis=1, dtype=np.int32)
        out[start : start + n] = torch.from_numpy(values)
    return out


def band_columns(indices: torch.Tensor, bands: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, k] int64: each row's columns over the given bands, band after band."""
    blocks = [indices[o : o + rows * w].long().reshape(rows, w) for o, w in bands.tolist()]
    return torch.cat(blocks, dim=1) if blocks else torch.empty(rows, 0, dtype=torch.long)


def top_band_indices(head: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The columns of each row that ``head`` ([rows, k] in-range, distinct per row) lacks, ascending: the
    indices of a top band that completes every row, which a file does not store."""
    rest = torch.ones(rows, cols, dtype=torch.bool).scatter_(1, head.long(), False)
    return torch.arange(cols).expand(rows, cols)[rest].reshape(rows, cols - head.shape[1])


def unpack_rows(values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The [rows, cols] float32 weight the given bands hold, zeros elsewhere: ``pack_rows`` undone."""
    w = torch.zeros(rows, cols, dtype=torch.float32)
    for offset, width in bands.tolist():
        if width:
            block = slice(offset, offset + rows * width)
            w.scatter_add_(1, indices[block].reshape(rows, width).long(), values[block].reshape(rows, width).float())
    return w
