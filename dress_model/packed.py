"""The packed model: a DRESS model whose sparse layers run from packed buffers, every density from one copy.

``PackedModel`` is what a device holds, trains and serves, and what travels: built from a trained DressModel
(``from_dress``) or a file (``load``/``from_bytes``, checked by ``dress_model.packed_checks``), written back with
``to_bytes``/``save`` in the format of ``dress_model.packed_format``. ``set_density`` is O(1): every layer
(``dress_model.packed_layer``) reads a longer or shorter prefix of the same buffers. Inference runs the active
subnet's compiled forward (``dress_model.native_forward``) in one native call; training runs layer by layer
through the differentiable packed ops, so a device trains its subnet without ever building a dense weight, mask
or order; switching back to inference re-folds BN into the kernels' epilogue.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from dress_model.checkpoint import atomic_write, dress_header
from dress_model.layers import DensityBatchNorm, RowSparse
from dress_model.models import Architecture, DressModel, create_model
from dress_model.native_forward import Compiled, choose_full_density, compile_forward, freeze_dense
from dress_model.packed_checks import (
    check_declared_shapes,
    check_declared_size,
    check_layer,
    stored_tensors,
    with_top_band,
)
from dress_model.packed_format import (
    FORMAT,
    MAX_LOAD_BYTES,
    VERSION,
    PackedFormatError,
    band_columns,
    band_table,
    index_bits,
    index_dtype_for,
    pack_index_bits,
    pack_rows,
    prefix_lengths,
    top_band_indices,
    unpack_index_bits,
    unpack_rows,
)
from dress_model.packed_layer import PackedSparse


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

    def level_of(self, density: float) -> int:
        return self.net.level_of(density)

    def train(self, mode: bool = True) -> PackedModel:
        """Training mode: layers compute through the differentiable packed ops and BN normalises with batch
        statistics; back to inference, BN is folded into the kernels again with the trained values."""
        was_training = self.training
        super().train(mode)
        for _, layer in self.packed_layers():
            layer.set_mode(mode)
        if was_training and not mode:
            self.finalize()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference runs the active subnet's compiled forward (``native_forward``) in one native call
        where it can, else layer by layer; training always layer by layer (autograd)."""
        if self.training:
            return self.net(x)
        index = self.net.active_level
        native = self.compiled(index)
        if native is not None and native.accepts(x):
            with torch.inference_mode():
                return native(x)
        return self.forward_layers(x)

    def compiled(self, index: int) -> Compiled | None:
        """The compiled forward of the subnet at density index ``index`` (compiled on first use); None: that
        subnet runs layer by layer."""
        if index not in self._native:
            self._native[index] = self._compile(index)
        return self._native[index]

    @property
    def compiled_indices(self) -> set[int]:
        """The density indices whose forward is compiled already."""
        return set(self._native)

    def compile(self) -> PackedModel:
        """Compile every density's forward now rather than on its first use (a full top subnet takes about a
        second to freeze): what an agent does before a new model takes requests."""
        active = self.net.active_level
        try:
            for index in range(len(self.densities)):
                if index not in self._native:
                    self.net.active_level = index  # the per-layer way is timed at its own density
                    self._native[index] = self._compile(index)
        finally:
            self.net.active_level = active
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

    def finalize(self) -> None:
        """Refold BN and rebuild the dense copies from the values as they are now (after training, or an edit in
        place), and forget the compiled forwards that pointed at the old ones."""
        for _, layer in self.packed_layers():
            layer.finalize()
        self._native = {}  # compiled forwards point at the epilogues just replaced: compile again on use

    def nbytes(self, density: float | None = None) -> int:
        """Tensor bytes a device holds to run every subnet up to ``density`` (default: all stored ones)."""
        index = len(self.densities) - 1 if density is None else self.net.level_of(density)
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
        kept = model.densities[:len(model.densities) if max_density is None else model.level_of(max_density) + 1]
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
        packed.finalize()
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
        want = stored_tensors(declared)
        check_declared_shapes(source, want, data)
        check_declared_size(source, declared, want, data, max_bytes)
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
                tensors[f"{name}.indices"] = with_top_band(source, name, layer, tensors[f"{name}.indices"])
            check_layer(source, name, layer, tensors)
        try:
            packed.net.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise PackedFormatError(f"{source}: tensors do not match the declared architecture: {e}") from None
        packed.finalize()
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


def pack_checkpoint(model: DressModel, max_density: float | None = None) -> PackedModel:
    """Convenience for callers holding a training model (CLI, coordinator)."""
    return PackedModel.from_dress(copy.deepcopy(model).eval(), max_density)
