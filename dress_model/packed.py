"""The packed row-sparse format and the runtime that executes it: one stored copy, every density.

Per sparse layer, with the model's densities d_1 < ... < d_n (up to a chosen maximum) and
k_i = ceil(d_i * cols), *band* i holds every row's importance-ranked entries k_{i-1}..k_i-1 as a
[rows, k_i - k_{i-1}] block. ``values`` (float32) and ``indices`` (int16, or int32 for rows longer than
32767; the column in the layer's 2-D weight view) concatenate the blocks, so density d_i is the first i
bands: a contiguous prefix of both buffers. Switching density picks how many bands the kernel reads;
nothing is copied or allocated. Inside a band, indices are sorted ascending for input locality.

The same file is what is stored on a device, shipped by the coordinator and executed by the kernel:
safetensors tensors + a JSON header (format, version, architecture, densities); BN statistics per density
travel as tensors and are folded into the kernel's per-row scale/shift at load time.

Full density at dense cost: when a layer's top band completes every row (k_n = cols, i.e. the model is stored
up to d=1), the file omits that band's indices — they are the columns the earlier bands miss, ascending, and
the loader rebuilds them — and that subnet runs as a dense layer (F.conv2d / F.linear on the weight rebuilt
at load, BN folded in), which is faster than any sparse kernel at 100 % density. A file may also carry its
float tensors as float16 (``to_bytes(half=True)``): half the bytes on the wire, computed in float32.
Stored indices travel bit-packed, ``index_bits(cols)`` bits each (10 for a 576-column row instead of int16's 16), and are unpacked
to the kernels' int16/int32 at load.

A file comes from someone else: before building anything the loader checks that its header's tensors are the
ones its architecture needs, that the file carries their bytes, and that loading them takes at most
``MAX_LOAD_BYTES`` (``load_bytes``), so a small file cannot make it allocate a large model.

Training runs on the same buffers: in training mode a layer computes through the differentiable packed ops
(``dress_model.kernels.autograd``) with ``values`` as its parameter and its BN unfolded (batch statistics),
so a device trains its subnet without ever building a dense weight, mask or order; switching back to
inference re-folds BN into the kernels' epilogue.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from dress_model import kernels
from dress_model.kernels import autograd as packed_ops
from dress_model.checkpoint import atomic_write, dress_header
from dress_model.layers import DensityAware, DensityBatchNorm, DressConv2d, RowSparse
from dress_model.models import Architecture, DressModel, create_model
from dress_model.native_forward import Compiled, choose_full_density, compile_forward, freeze_dense
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


class PackedSparse(DensityAware, nn.Module):
    """A sparse layer executed from its packed buffers by the native kernel, BN (and ReLU) fused."""

    def __init__(self, layer: RowSparse, densities: tuple[float, ...]) -> None:
        nn.Module.__init__(self)
        self._init_density(densities)
        self.rows, self.cols = layer.rows, layer.cols
        self.is_conv = isinstance(layer, DressConv2d)
        if self.is_conv:
            conv: nn.Conv2d = layer  # type: ignore[assignment]
            self.in_channels, self.kernel_size = conv.in_channels, conv.kernel_size
            self.stride, self.padding = conv.stride, conv.padding
        else:
            self.in_channels = layer.cols
        ks = prefix_lengths(densities, self.cols)
        self.full_top = ks[-1] == self.cols  # the top band completes every row: no stored indices, run dense
        self.stored_indices = stored_index_count(ks, self.rows, self.cols)
        self.register_buffer("bands", band_table(ks, self.rows))
        n = self.rows * ks[-1]
        # Parameters, so training updates the packed values in place; they require grad only in training
        # mode (PackedModel.train), so inference and in-place edits never meet autograd.
        self.values = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)
        self.register_buffer("indices", torch.zeros(n, dtype=index_dtype_for(self.cols)))
        self.bias = None if layer.bias is None else nn.Parameter(torch.zeros(self.rows), requires_grad=False)
        self._norm: list[DensityBatchNorm] = []  # a list so the BN stays registered where the model put it
        self._views: list[torch.Tensor] = []
        self._epilogue: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self._dense: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the full top band's dense layer
        self._placement: torch.Tensor | None = None  # training a full top band: values index per dense weight

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """The layer's weight shape as torch's dense conv / linear takes it."""
        return (self.rows, self.in_channels, *self.kernel_size) if self.is_conv else (self.rows, self.cols)

    def entries(self, index: int) -> int:
        """Stored entries the subnet at density index ``index`` reads: rows * k_index."""
        offset, width = self.bands[index].tolist()
        return offset + self.rows * width

    def fuse(self, norm: DensityBatchNorm) -> None:
        """Fold ``norm`` into this layer's epilogue; the BN module itself then passes its input through."""
        norm.folded = True
        self._norm = [norm]

    @torch.no_grad()
    def finalize(self) -> None:
        """Precompute per-density band views and folded BN so forward and switching allocate nothing."""
        self._views = [self.bands[: i + 1] for i in range(len(self.densities))]
        self._epilogue = []
        for i in range(len(self.densities)):
            if not self._norm:
                self._epilogue.append((None, None))
                continue
            scale, shift = self._norm[0].scale_shift(i)
            if self.bias is not None:
                shift = shift + scale * self.bias
            self._epilogue.append((scale.contiguous(), shift.contiguous()))
        self._dense = None
        if self.full_top:  # the top subnet as a dense layer, its BN folded into weight and bias
            weight = unpack_rows(self.values, self.indices, self.bands, self.rows, self.cols)
            scale, shift = self._epilogue[-1]
            if scale is not None:
                weight, bias = weight * scale[:, None], shift
            else:
                bias = self.bias
            self._dense = (weight.reshape(self.dense_shape).contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.active_index
        if self.training:
            return self._forward_train(x, i)
        if self._dense is not None and i == len(self._epilogue) - 1:
            return self._forward_dense(x)
        scale, shift = self._epilogue[i]
        bias = self.bias if scale is None else None
        x = x.contiguous()
        if self.is_conv:
            return kernels.packed_conv2d(
                x, self.values, self.indices, self._views[i], self.rows, self.kernel_size,
                self.stride, self.padding, bias=bias, scale=scale, shift=shift, in_channels=self.in_channels,
            )  # fmt: skip
        # The input's size is checked on every call (nanoseconds): the stored indices address the layer's
        # columns, and a narrower input would have the kernel read past it.
        return kernels.packed_linear(
            x, self.values, self.indices, self._views[i], self.rows, bias=bias, scale=scale, shift=shift,
            in_features=self.cols,
        )

    def _forward_train(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The subnet's first ``i + 1`` bands, differentiable w.r.t. x, values and bias; BN follows unfolded.

        A full top band holds every weight of the layer, permuted: that subnet trains as a dense layer on the
        values gathered into place (the gradient scatters back onto them), as fast as dense training and no
        larger than the values themselves; the sparser subnets train through the packed kernels."""
        if self.full_top and i == len(self.densities) - 1:
            if self._placement is None:  # for each dense position, the stored entry that holds its weight
                rows = torch.cat([torch.arange(self.rows).repeat_interleave(w) for _, w in self.bands.tolist()])
                at = rows * self.cols + self.indices.long()  # entry e's dense position, entries in stored order
                self._placement = torch.empty(at.numel(), dtype=torch.int32).scatter_(  # as large as the values
                    0, at, torch.arange(at.numel(), dtype=torch.int32))
            weight = self.values[self._placement].view(self.dense_shape)
            if self.is_conv:
                return F.conv2d(x, weight, self.bias, self.stride, self.padding)
            return F.linear(x, weight, self.bias)
        bands = self.bands[: i + 1]
        if self.is_conv:
            y = packed_ops.conv2d(x, self.values, self.indices, bands, self.rows, self.kernel_size, self.stride,
                                  self.padding)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        y = packed_ops.linear(x, self.values, self.indices, bands, self.rows)
        return y if self.bias is None else y + self.bias

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._dense  # type: ignore[misc]
        width = self.in_channels
        if x.dim() < 2 or x.shape[1 if self.is_conv else -1] != width:  # the packed path's error, not torch's
            raise ValueError(f"input must have {width} {'channels' if self.is_conv else 'features'}, "
                             f"got shape {list(x.shape)}")
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        return F.linear(x, weight, bias)


def _fusable(model: DressModel) -> Iterator[tuple[str, str]]:
    """(sparse layer, BN) pairs where the BN directly normalises that layer's output.

    Every model here registers a body layer immediately before the norm applied to its output; the
    packed-vs-masked equivalence tests guard this convention.
    """
    named = list(model.named_modules())
    for (name, m), (next_name, nxt) in zip(named, named[1:]):
        if isinstance(m, RowSparse) and isinstance(nxt, DensityBatchNorm):
            yield name, next_name


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


class PackedModel(nn.Module):
    """A DRESS model whose sparse layers run from packed buffers; ``set_density`` is O(1) per layer."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.net = create_model(arch)
        fusable = list(_fusable(self.net))
        self.sparse_names: list[str] = []
        for name, layer in list(self.net.sparse_layers()):
            _set(self.net, name, PackedSparse(layer, arch.densities))
            self.sparse_names.append(name)
        for layer_name, norm_name in fusable:
            packed: PackedSparse = self.net.get_submodule(layer_name)  # type: ignore[assignment]
            packed.fuse(self.net.get_submodule(norm_name))  # type: ignore[arg-type]
        self.net.link_density()
        self._native: dict[int, Compiled | None] = {}  # density index -> its compiled forward (forward)
        nn.Module.train(self, False)  # inference until train() is called; nothing to re-fold yet

    @property
    def densities(self) -> tuple[float, ...]:
        return self.arch.densities

    @property
    def active_density(self) -> float:
        return self.net.active_density

    def set_density(self, density: float) -> None:
        """Switch subnet: every layer reads a shorter or longer prefix of the same buffers."""
        self.net.set_density(density)

    def density_index(self, density: float) -> int:
        return self.net.density_index(density)

    def train(self, mode: bool = True) -> PackedModel:
        """Training mode: layers compute through the differentiable packed ops and BN normalises with batch
        statistics; back to inference, BN is folded into the kernels again with the trained values."""
        was_training = self.training
        super().train(mode)
        for _, layer in self.packed_layers():
            for norm in layer._norm:
                norm.folded = not mode
            for p in (layer.values, layer.bias):
                if p is not None:
                    p.requires_grad_(mode)
            if mode:
                layer._dense = None  # the inference-only dense copy of a full top band: rebuilt on eval
            else:
                layer._placement = None  # training-only
        if was_training and not mode:
            self._finalize()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference runs the active subnet's compiled forward (``native_forward``) in one native call
        where it can, else layer by layer; training always layer by layer (autograd)."""
        if self.training:
            return self.net(x)
        index = self.net._cell.index
        if index not in self._native:
            self._native[index] = self._compile(index)
        native = self._native[index]
        if native is not None and native.accepts(x):
            with torch.inference_mode():
                return native(x)
        return self.forward_layers(x)

    def compile(self) -> PackedModel:
        """Compile every density's forward now rather than on its first use (a full top subnet takes about a
        second to freeze): what an agent does before a new model takes requests."""
        active = self.net._cell.index
        try:
            for index in range(len(self.densities)):
                if index not in self._native:
                    self.net._cell.index = index  # the per-layer way is timed at its own density
                    self._native[index] = self._compile(index)
        finally:
            self.net._cell.index = active
        return self

    def _compile(self, index: int) -> Compiled | None:
        """The subnet's compiled forward: one native program (its small-batch thread count timed); for the
        full top subnet of a model stored up to d=1, the fastest at batch 1 of that program, the dense
        network frozen (oneDNN) and its dense layers one by one (``FullDensity``). None: layer by layer."""
        shape = (self.arch.in_channels, self.arch.image_size, self.arch.image_size)
        native = compile_forward(self.net, index, shape)
        if native is not None:
            native.tune_threads()
        if index < len(self.densities) - 1 or not all(layer.full_top for _, layer in self.packed_layers()):
            return native
        return choose_full_density(native, freeze_dense(self.to_dress().eval(), shape), self.forward_layers, shape)

    def __getstate__(self) -> dict[str, object]:
        """Copies compile their own forwards: a compiled one points into this model's buffers."""
        state = self.__dict__.copy()
        state["_native"] = {}
        return state

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """Layer by layer, in the current mode: training, and the reference the compiled forward is tested
        against (also what forward hooks on the layers see)."""
        if self.training:
            return self.net(x)
        with torch.inference_mode():
            return self.net(x)

    def packed_layers(self) -> Iterator[tuple[str, PackedSparse]]:
        for name in self.sparse_names:
            yield name, self.net.get_submodule(name)  # type: ignore[misc]

    def _finalize(self) -> None:
        for _, layer in self.packed_layers():
            layer.finalize()
        self._native = {}  # compiled forwards point at the epilogues just replaced: compile again on use

    def nbytes(self, density: float | None = None) -> int:
        """Tensor bytes a device holds to run every subnet up to ``density`` (default: all stored ones)."""
        index = len(self.densities) - 1 if density is None else self.net.density_index(density)
        n = len(self.densities)
        total = 0
        for name, t in self.net.state_dict().items():
            owner, _, field = name.rpartition(".")
            module = self.net.get_submodule(owner)
            if isinstance(module, PackedSparse):
                if field in ("values", "indices"):
                    total += module.entries(index) * t.element_size()
                    if field == "values" and module.full_top and index == n - 1:  # and its dense layer
                        total += t.numel() * t.element_size()
                elif field != "bands":  # the band table is derived from the header, never stored
                    total += t.numel() * t.element_size()
            elif isinstance(module, DensityBatchNorm) and t.dim() >= 1 and t.shape[0] == n:
                total += (index + 1) * t[0].numel() * t.element_size()
            else:
                total += t.numel() * t.element_size()
        return total

    # -- building and storing --------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_dress(cls, model: DressModel, max_density: float | None = None) -> PackedModel:
        """Pack a trained DRESS model, keeping the densities up to ``max_density`` (default: all)."""
        top = model.densities[-1] if max_density is None else max_density
        model.density_index(top)
        kept = tuple(d for d in model.densities if d <= top + 1e-12)
        n = len(kept)
        packed = cls(replace(model.arch, densities=kept))
        state: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():
            module = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, DensityBatchNorm) and t.dim() == 2 and t.shape[0] == len(model.densities):
                t = t[:n]  # per-density statistics / affine of the kept densities
            elif isinstance(module, DensityBatchNorm) and name.endswith("num_batches"):
                t = t[:n]
            state[name] = t
        for name, layer in model.sparse_layers():
            ks = prefix_lengths(kept, layer.cols)
            values, indices = pack_rows(layer.weight2d().float(), layer.order, ks)
            del state[f"{name}.weight"], state[f"{name}.order"]
            state[f"{name}.values"], state[f"{name}.indices"] = values, indices
            state[f"{name}.bands"] = band_table(ks, layer.rows)
        packed.net.load_state_dict(state, strict=True)
        packed._finalize()
        return packed

    def save(self, path: str | Path, half: bool = False) -> Path:
        path = Path(path)
        data = self.to_bytes(half)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return path

    @classmethod
    def load(cls, path: str | Path, *, max_bytes: int = MAX_LOAD_BYTES) -> PackedModel:
        """Load and validate a packed file; any inconsistency is a PackedFormatError, never a crash."""
        path = Path(path)
        if not path.is_file():
            raise PackedFormatError(f"packed model {path} does not exist; create one with `dress-fleet pack`")
        if (size := path.stat().st_size) > max_bytes:  # its tensors alone exceed the cap: refused unread
            raise PackedFormatError(f"{path} is {size:,} bytes, more than the {max_bytes:,} a load may take "
                                    "(max_bytes)")
        return cls.from_bytes(path.read_bytes(), source=str(path), max_bytes=max_bytes)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", *, max_bytes: int = MAX_LOAD_BYTES) -> PackedModel:
        """Load and validate a packed file's bytes; refused unless they hold every tensor the declared
        architecture needs and loading it takes at most ``max_bytes`` of tensors (``load_bytes``)."""
        header = dress_header(data, source, FORMAT, VERSION, PackedFormatError, "packed DRESS model")
        try:
            arch = Architecture.from_json(header["architecture"])
        except (ValueError, KeyError, TypeError) as e:
            raise PackedFormatError(f"{source}: invalid architecture: {e}") from None
        with torch.device("meta"):
            declared = create_model(arch)  # shapes, no memory: every check below runs before anything is allocated
        want = _stored_tensors(declared)
        _check_declared_shapes(source, want, data)
        _check_declared_size(source, declared, want, data, max_bytes)
        try:
            packed = cls(arch)
            tensors = load_tensors(data)
        except (SafetensorError, ValueError, KeyError, TypeError) as e:
            raise PackedFormatError(f"{source}: invalid packed model: {e}") from None
        for key, tensor in tensors.items():
            if tensor.is_floating_point():
                if tensor.dtype not in (torch.float32, torch.float16):
                    raise PackedFormatError(f"{source}: {key} is {tensor.dtype}; floats travel as float32 or float16")
                tensors[key] = tensor = tensor.float()  # computed in float32 whatever it travelled as
                if not bool(torch.isfinite(tensor).all()):
                    raise PackedFormatError(f"{source}: {key} holds non-finite values (NaN or infinity)")
        for name, layer in packed.packed_layers():
            tensors[f"{name}.bands"] = layer.bands
            stored = tensors[f"{name}.indices"]
            if stored.dtype != torch.uint8:
                raise PackedFormatError(f"{source}: {name}.indices must be bit-packed uint8, got {stored.dtype}")
            tensors[f"{name}.indices"] = unpack_index_bits(stored, layer.stored_indices, index_bits(layer.cols),
                                                           index_dtype_for(layer.cols))
            if layer.full_top:
                tensors[f"{name}.indices"] = _with_top_band(source, name, layer, tensors[f"{name}.indices"])
            _check_layer(source, name, layer, tensors)
        try:
            packed.net.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise PackedFormatError(f"{source}: tensors do not match the declared architecture: {e}") from None
        packed._finalize()
        return packed

    def to_bytes(self, half: bool = False) -> bytes:
        """The file: every tensor but the band tables and a full top band's indices; ``half``: floats as
        float16 (ValueError for a value float16 cannot hold)."""
        header = {"format": FORMAT, "version": VERSION, "architecture": self.arch.to_json()}
        tensors = {k: v.contiguous() for k, v in self.net.state_dict().items() if not k.endswith(".bands")}
        for name, layer in self.packed_layers():
            tensors[f"{name}.indices"] = pack_index_bits(layer.indices[: layer.stored_indices], index_bits(layer.cols))
        if half:
            for key, t in tensors.items():
                if t.is_floating_point():
                    if t.numel() and float(t.abs().max()) > torch.finfo(torch.float16).max:
                        raise ValueError(f"{key} holds values beyond float16's range; store this model in float32")
                    tensors[key] = t.half()
        return save_tensors(tensors, metadata={"dress": json.dumps(header)})

    @torch.no_grad()
    def to_dress(self) -> DressModel:
        """Rebuild a trainable DRESS model with the same subnets (weights outside every band are zero)."""
        model = create_model(self.arch)
        state = dict(self.net.state_dict())
        for name, layer in self.packed_layers():
            rows, cols = layer.rows, layer.cols
            weight = unpack_rows(layer.values, layer.indices, layer.bands, rows, cols)
            head = band_columns(layer.indices, layer.bands, rows)
            tail = top_band_indices(head, rows, cols)
            target: RowSparse = model.get_submodule(name)  # type: ignore[assignment]
            for key in ("values", "indices", "bands"):
                del state[f"{name}.{key}"]
            state[f"{name}.weight"] = weight.reshape(target.weight.shape)
            state[f"{name}.order"] = torch.cat([head, tail], dim=1).to(torch.int32)
        model.load_state_dict(state, strict=True)
        return model


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


def _stored_tensors(net: DressModel) -> Stored:
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


def _check_declared_shapes(source: str, want: Stored, data: bytes) -> None:
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


def _check_declared_size(source: str, net: DressModel, want: Stored, data: bytes, max_bytes: int) -> None:
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


def _with_top_band(source: str, name: str, layer: PackedSparse, head: torch.Tensor) -> torch.Tensor:
    """A full-top layer's stored indices (its lower bands) checked, then completed by the top band's."""
    known = _checked_columns(source, name, head, layer.bands[:-1], layer.rows, layer.cols)
    top = top_band_indices(known, layer.rows, layer.cols).to(head.dtype).reshape(-1)
    return torch.cat([head, top])


def _check_layer(source: str, name: str, layer: PackedSparse, tensors: dict[str, torch.Tensor]) -> None:
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
    _checked_columns(source, name, indices, layer.bands, layer.rows, layer.cols)


def _checked_columns(source: str, name: str, indices: torch.Tensor, bands: torch.Tensor, rows: int,
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


def pack_checkpoint(model: DressModel, max_density: float | None = None) -> PackedModel:
    """Convenience for callers holding a training model (CLI, coordinator)."""
    return PackedModel.from_dress(copy.deepcopy(model).eval(), max_density)

