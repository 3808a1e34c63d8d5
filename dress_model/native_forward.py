"""A packed subnet's inference forward compiled into one native call (``kernels.run_plan``).

At batch 1 a subnet's layers take microseconds each, and the per-layer path (``PackedSparse.forward`` called
from the model's Python ``forward``, torch's ReLU, pooling and adds between them) spent about as long again in
Python and allocation. A ``NativeForward`` is the same computation as a program of records the native side runs
back to back: packed conv / linear with the folded BN and ReLU, the dense stem and head as one-band packed
layers, max and mean pooling, residual add + ReLU; activations live in scratch buffers allocated once per
batch size. The full top subnet of a model stored up to d=1 is also frozen dense (oneDNN), and whichever of
its ways was fastest at batch 1 serves it (``FullDensity``). The per-layer path stays the reference these are
tested against (tests/test_native_forward.py), and runs whatever the compiler does not take: training, inputs
a program was not compiled for, and models it does not know.

Switching density stays one store: each density index has its own program, compiled on first use.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dress_model import kernels
from dress_model.layers import DensityBatchNorm
from dress_model.models import CifarResNet, SmallCNN
from dress_model.packed_format import index_dtype_for
from dress_model.packed_layer import PackedSparse

log = logging.getLogger(__name__)

CONV, LINEAR, MAX_POOL, MEAN_POOL, ADD = (kernels.PLAN_OPS[k] for k in ("conv", "linear", "max_pool", "mean_pool", "add"))
FIELDS = kernels.PLAN_FIELDS  # int64 fields per record
INPUT, OUTPUT = 0, 1  # the input's and the output's slots; scratch slots follow
KEEP_SCRATCH_FLOATS = 4 << 20  # scratch kept between calls up to 16 MB
SMALL_BATCH = 4  # batches up to this size run with the tuned thread count (NativeForward.tune_threads)


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    """Median of ``rounds`` timed calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass
class _Value:
    """A symbolic activation: its per-image shape."""

    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class _Program:
    """Records over symbolic values, then slots assigned by liveness (``assign``)."""

    values: list[_Value] = field(default_factory=list)
    records: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (fields, [in, out, aux])
    keep: list[torch.Tensor] = field(default_factory=list)  # tensors the records point into

    def value(self, shape: tuple[int, ...]) -> int:
        self.values.append(_Value(shape))
        return len(self.values) - 1

    def emit(self, fields: list[int], src: int, out_shape: tuple[int, ...], aux: int = -1,
             into: int | None = None) -> int:
        out = self.value(out_shape) if into is None else into
        self.records.append((fields, [src, out, aux]))
        return out

    def _ptr(self, t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        if not (t.is_contiguous() and t.dtype in (torch.float32, torch.int16, torch.int32, torch.int64)):
            raise ValueError("native forward: every buffer must be contiguous float32 / int16 / int32 / int64")
        self.keep.append(t)
        return t.data_ptr()

    def layer(self, op: int, src: int, values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor, rows: int,
              scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
              geometry: tuple[int, ...] = (0, 0, 0, 0, 0, 0)) -> int:
        shape = self.values[src].shape
        if op == CONV:
            c, h, w = shape
            kh, kw, sh, sw, ph, pw = geometry
            out_shape: tuple[int, ...] = (rows, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
        else:
            c, h, w = self.values[src].size, 1, 1
            out_shape = (rows,)
        fields = [op, 0, 0, 0, self._ptr(values), values.numel(), self._ptr(indices), indices.numel(),
                  int(indices.dtype == torch.int32), self._ptr(bands), bands.shape[0], rows, c, h, w, *geometry,
                  self._ptr(scale), self._ptr(shift), int(relu)]
        return self.emit(fields, src, out_shape)

    def pool(self, src: int, kernel: tuple[int, int], stride: tuple[int, int]) -> int:
        c, h, w = self.values[src].shape
        out_shape = (c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
        return self.emit([MAX_POOL, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, c, h, w, *kernel, *stride, 0, 0, 0, 0, 0],
                         src, out_shape)

    def mean_pool(self, src: int) -> int:
        c, h, w = self.values[src].shape
        return self.emit([MEAN_POOL, *[0] * 11, c, h, w, *[0] * 9], src, (c,))

    def add_relu(self, src: int, other: int) -> int:
        """src + other, ReLU, written over src."""
        n = self.values[src].size
        return self.emit([ADD, *[0] * 11, n, 1, 1, *[0] * 8, 1], src, self.values[src].shape, aux=other,
                         into=src)

    def assign(self, result: int) -> tuple[torch.Tensor, list[int]]:
        """Slots by liveness: a value's slot is free again after its last reader; the input and the result
        keep their own. Returns the records with slots filled in, and each scratch slot's floats per image."""
        last = {}
        for i, (_, ids) in enumerate(self.records):
            for v in ids:
                if v >= 0:
                    last[v] = i
        slot_of = {0: INPUT, result: OUTPUT}
        sizes: list[int] = []  # scratch slots (slot = 2 + position)
        free: list[int] = []
        rows = []
        for i, (fields, (src, out, aux)) in enumerate(self.records):
            if out not in slot_of:
                size = self.values[out].size
                if free:
                    s = free.pop()
                    sizes[s - 2] = max(sizes[s - 2], size)
                else:
                    sizes.append(size)
                    s = len(sizes) + 1
                slot_of[out] = s
            fields = list(fields)
            fields[1], fields[2], fields[3] = slot_of[src], slot_of[out], slot_of[aux] if aux >= 0 else -1
            rows.append(fields)
            for v in {src, aux} - {-1, out}:
                if last[v] == i and slot_of[v] >= 2:
                    free.append(slot_of[v])
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, FIELDS), sizes


class Compiled:
    """A subnet's compiled inference forward, for inputs shaped as it was compiled for."""

    def __init__(self, in_shape: tuple[int, ...]) -> None:
        self.in_shape = in_shape

    def accepts(self, x: torch.Tensor) -> bool:
        """x is what it was compiled for: float32, contiguous, on the CPU, [B, *in_shape]."""
        return (x.dtype is torch.float32 and x.is_cpu and x.dim() == len(self.in_shape) + 1
                and tuple(x.shape[1:]) == self.in_shape and x.is_contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NativeForward(Compiled):
    """A sparse subnet: ``__call__(x)`` runs it in one native call."""

    def __init__(self, program: _Program, result: int, in_shape: tuple[int, ...]) -> None:
        super().__init__(in_shape)
        self.records, self.sizes = program.assign(result)
        self.keep = program.keep
        self.out_size = program.values[result].size
        self._scratch: tuple[int, list[torch.Tensor]] | None = None  # (batch, buffers)
        self._lock = threading.Lock()  # the scratch buffers are one forward's at a time
        self.small_batch_threads: int | None = None  # tune_threads; None: torch's thread count

    def tune_threads(self, rounds: int = 15) -> None:
        """Pick the thread count for small batches by timing batch 1 both ways. Waking a second core costs
        microseconds per layer, which the smallest subnets' layers do not win back; larger ones do."""
        most = torch.get_num_threads()
        if most < 2:
            return
        x = torch.zeros(1, *self.in_shape)
        times = {}
        for threads in (1, most):
            self.small_batch_threads = threads
            times[threads] = median_seconds(lambda: self(x), rounds)
        self.small_batch_threads = min(times, key=times.__getitem__)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        out = torch.empty(batch, self.out_size, dtype=torch.float32)
        with self._lock:
            if self._scratch is not None and self._scratch[0] == batch:
                scratch = self._scratch[1]
            else:
                scratch = [torch.empty(max(1, batch * s), dtype=torch.float32) for s in self.sizes]
                # kept for the next call of this batch size unless large (an evaluation batch): a device
                # serving batch 1 allocates nothing per request, and nobody holds an evaluation's worth
                self._scratch = (batch, scratch) if batch * sum(self.sizes) <= KEEP_SCRATCH_FLOATS else None
            buffers = [x, out, *scratch]
            slots = torch.tensor([v for t in buffers for v in (t.data_ptr(), t.numel())], dtype=torch.int64)
            threads = self.small_batch_threads if batch <= SMALL_BATCH else None
            kernels.run_plan(self.records, slots, batch, threads)
        return out


class FrozenDense(Compiled):
    """The full top subnet, every weight in place, as a frozen TorchScript module optimised for inference (BN
    folded into the convolutions, oneDNN-prepacked weights: what the dense baseline runs), compiled once from
    the model's dense copy."""

    def __init__(self, module: torch.jit.ScriptModule, in_shape: tuple[int, ...]) -> None:
        super().__init__(in_shape)
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)


def freeze_dense(dense: nn.Module, in_shape: tuple[int, ...]) -> FrozenDense | None:
    """``dense`` (in eval mode, at the density to run) frozen; None where this torch build cannot."""
    x = torch.zeros(1, *in_shape)
    try:
        # Tracing at one density bakes its masks and BN row in as constants, which is what freezing wants;
        # torch's tracer and deprecation warnings say nothing about that to a user.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            module = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(dense, x)))
            module(x)
    except (RuntimeError, torch.jit.Error):  # type: ignore[attr-defined]
        log.warning("the dense top subnet could not be frozen; it runs layer by layer", exc_info=True)
        return None
    return FrozenDense(module, in_shape)


class FullDensity(Compiled):
    """The full top subnet (every weight in place) three ways: its native program (the top band packed like
    the others), the dense network frozen (oneDNN), its dense layers one by one. Each was timed once at batch
    1 and the fastest runs small batches: on a small model one native call beats torch's per-op overhead, on
    a larger one oneDNN's dense kernels win. Large batches run dense, where oneDNN's blocked kernels do."""

    def __init__(self, ways: dict[str, Callable[[torch.Tensor], torch.Tensor]], small: str, large: str,
                 in_shape: tuple[int, ...]) -> None:
        super().__init__(in_shape)
        self.ways, self.small, self.large = ways, small, large

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ways[self.small if x.shape[0] <= SMALL_BATCH else self.large](x)


def choose_full_density(native: NativeForward | None, frozen: FrozenDense | None,
                        layers: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...],
                        rounds: int = 15) -> FullDensity:
    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"layers": layers}
    if native is not None:
        ways["native"] = native
    if frozen is not None:
        ways["frozen"] = frozen
    x = torch.zeros(1, *in_shape)
    times = {}
    for name, way in ways.items():
        times[name] = median_seconds(lambda: way(x), rounds)  # noqa: B023 - called before the next iteration
    return FullDensity(ways, min(times, key=times.__getitem__), "frozen" if frozen is not None else "layers",
                       in_shape)


# -- what the native compiler knows: the models of dress_model.models, walked as their forward does -------


def _dense_as_packed(layer: nn.Conv2d | nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense layer as one band holding every column of every row, in column order."""
    rows = layer.weight.shape[0]
    cols = layer.weight[0].numel()
    values = layer.weight.detach().reshape(rows, cols).contiguous().reshape(-1)
    indices = torch.arange(cols, dtype=index_dtype_for(cols)).repeat(rows)
    return values, indices, torch.tensor([[0, cols]], dtype=torch.int64)


def _geometry(layer: nn.Module) -> tuple[int, ...]:
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    ph, pw = layer.padding
    return kh, kw, sh, sw, ph, pw


class _Unsupported(Exception):
    """The per-layer path runs this subnet."""


def _apply(p: _Program, src: int, layer: nn.Module, norm: DensityBatchNorm | None, index: int, relu: bool) -> int:
    """``relu(norm(layer(src)))`` as one record."""
    is_conv = isinstance(layer, nn.Conv2d) or getattr(layer, "is_conv", False)
    op = CONV if is_conv else LINEAR
    geometry = _geometry(layer) if is_conv else (0, 0, 0, 0, 0, 0)
    if isinstance(layer, PackedSparse):
        if norm is not layer.norm:
            raise _Unsupported("a BN that is not the layer's folded one")
        scale, shift = layer.epilogue(index)
        if scale is None:
            shift = layer.bias
        return p.layer(op, src, layer.values, layer.indices, layer.view(index), layer.rows, scale, shift, relu,
                       geometry)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or (is_conv and (layer.groups != 1 or layer.dilation != (1, 1))):
        raise _Unsupported(f"layer {type(layer).__name__}")
    values, indices, bands = _dense_as_packed(layer)
    bias = None if layer.bias is None else layer.bias.detach()
    scale = None
    if norm is not None:
        scale, shift = norm.scale_shift(index)
        shift = shift if bias is None else shift + scale * bias
        scale, shift = scale.contiguous(), shift.contiguous()
    else:
        shift = bias
    return p.layer(op, src, values, indices, bands, layer.weight.shape[0], scale, shift, relu, geometry)


def _small_cnn(net: SmallCNN, p: _Program, x: int, index: int) -> int:
    pool = net.pool
    kernel = (pool.kernel_size,) * 2 if isinstance(pool.kernel_size, int) else tuple(pool.kernel_size)
    stride = kernel if pool.stride is None else ((pool.stride,) * 2 if isinstance(pool.stride, int) else tuple(pool.stride))
    if pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
        raise _Unsupported("pooling other than plain max pooling")
    h = p.pool(_apply(p, x, net.conv1, net.bn1, index, relu=True), kernel, stride)
    h = p.pool(_apply(p, h, net.conv2, net.bn2, index, relu=True), kernel, stride)
    h = _apply(p, h, net.fc1, net.bn3, index, relu=True)  # flatten: NCHW is already [B, C*H*W]
    return _apply(p, h, net.fc2, None, index, relu=False)


def _resnet(net: CifarResNet, p: _Program, x: int, index: int) -> int:
    h = _apply(p, x, net.conv1, net.bn1, index, relu=True)
    for block in net.layers:
        t = _apply(p, h, block.conv1, block.bn1, index, relu=True)
        if isinstance(block.shortcut, nn.Identity):
            skip = h
        else:
            conv, norm = block.shortcut
            skip = _apply(p, h, conv, norm, index, relu=False)
        h = p.add_relu(_apply(p, t, block.conv2, block.bn2, index, relu=False), skip)
    return _apply(p, p.mean_pool(h), net.fc, None, index, relu=False)


def compile_forward(net: nn.Module, index: int, in_shape: tuple[int, int, int]) -> NativeForward | None:
    """The subnet at density index ``index`` of a packed model's network, compiled; None when the per-layer
    path must run it (see the module docstring)."""
    walkers = ((SmallCNN, _small_cnn), (CifarResNet, _resnet))
    walker = next((w for cls, w in walkers if type(net) is cls), None)
    if walker is None:
        return None
    p = _Program()
    x = p.value(in_shape)
    try:
        with torch.no_grad():
            result = walker(net, p, x, index)  # type: ignore[operator]
    except _Unsupported:
        return None
    return NativeForward(p, result, in_shape)
