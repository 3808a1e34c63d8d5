"""CPU kernels that execute DRESS subnets straight from the packed banded layout.

Layout (one buffer per layer, every density a contiguous prefix): band i holds, for every row,
the row's importance-ordered entries k_{i-1}..k_i - 1 (k_i = ceil(d_i * cols)) as a [rows, w_i]
row-major block; `values` (float32) and `indices` (int16, or int32 when cols > 32767; the column
in the row's 2-D weight view, c*kh*kw + i*kw + j for conv) concatenate the blocks.  `bands` is an
int64 [nb, 2] array of (offset, width) naming the blocks to read, so density d_i passes the
first i rows of the layer's band table and switching density copies nothing.

Indices inside a band may be in any order; ascending order (what `dress_model.packed_format.pack_rows` writes)
gives the kernels better input locality.

All wrappers validate dtypes/devices/contiguity here and sizes/band geometry natively (ValueError
either way), then hand the native code the tensors' data pointers: zero-copy, and cheaper than numpy
views (~0.7 us each), which matters when a whole batch-1 layer takes ~10 us.  The native ops release
the GIL and default to torch's thread count.  The forward ops and the backward ops (the gradients a packed
layer's training needs) are plain functions: outputs carry no autograd history, and
``dress_model.kernels.autograd`` wraps them into differentiable ops.
"""

from __future__ import annotations

import torch

from dress_model.kernels import _packed_sparse as _native

__all__ = [
    "packed_linear", "packed_conv2d", "packed_linear_backward", "packed_conv2d_backward", "validate_indices",
    "kernel_isa", "best_kernel_isa", "set_kernel_isa", "run_plan", "PLAN_FIELDS", "PLAN_OPS",
]

PLAN_FIELDS: int = _native.plan_fields  # int64 fields per record of a compiled forward (run_plan)
PLAN_OPS: dict[str, int] = dict(_native.plan_ops)  # a record's op code by name


_F32 = torch.float32
_IDX = (torch.int16, torch.int32)


def _ok(t: object, dtype: torch.dtype) -> bool:
    """What the native code can read in place; one expression keeps the per-tensor cost ~0.3 us."""
    return isinstance(t, torch.Tensor) and t.dtype is dtype and t.is_cpu and t.layout is torch.strided and t.is_contiguous()


def _reject(t: object, name: str, dtypes: tuple[torch.dtype, ...]) -> ValueError:
    """The specific reason `t` failed `_ok`, as the error to raise."""
    if not isinstance(t, torch.Tensor):
        return ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        return ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_cpu or t.layout is not torch.strided:
        return ValueError(f"{name} must be a dense CPU tensor, got {t.layout} on {t.device}")
    return ValueError(f"{name} must be contiguous (call .contiguous() once at load time)")


def _check(t: object, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if not any(_ok(t, d) for d in dtypes):
        raise _reject(t, name, dtypes)


def _vec(t: torch.Tensor | None, name: str, rows: int) -> int:
    """Data pointer of an optional per-row float32 vector (0 = absent)."""
    if t is None:
        return 0
    _check(t, name, (_F32,))
    if t.dim() != 1 or t.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}], got {list(t.shape)}")
    return t.data_ptr()


def _packed(values: torch.Tensor, indices: torch.Tensor, bands: torch.Tensor) -> tuple[int, int, int, int, bool, int, int]:
    """Pointers and sizes of the packed buffers (the native side checks the band geometry)."""
    idx32 = _ok(indices, torch.int32)
    if not (_ok(values, _F32) and (idx32 or _ok(indices, torch.int16)) and _ok(bands, torch.int64)):
        _check(values, "values", (_F32,))
        _check(indices, "indices", _IDX)
        _check(bands, "bands", (torch.int64,))
    if values.dim() != 1 or indices.dim() != 1:
        raise ValueError(f"values and indices must be 1-D, got {list(values.shape)} and {list(indices.shape)}")
    if bands.dim() != 2 or bands.shape[1] != 2:
        raise ValueError(f"bands must be [nb, 2] (offset, width), got {list(bands.shape)}")
    return values.data_ptr(), values.shape[0], indices.data_ptr(), indices.shape[0], idx32, bands.data_ptr(), bands.shape[0]


def _epilogue(
    rows: int, bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> tuple[int, int]:
    """Bias is a shift without scale; with BN folded in, pass scale/shift (bias folded into shift)."""
    if bias is not None and shift is not None:
        raise ValueError("pass either bias or shift, not both (fold the bias into shift = shift + scale * bias)")
    return _vec(scale, "scale", rows), (_vec(shift, "shift", rows) if bias is None else _vec(bias, "bias", rows))


def _threads(threads: int | None) -> int:
    """torch's intra-op thread count by default, so the kernels follow torch.set_num_threads."""
    n = torch.get_num_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    return n


def packed_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bands: torch.Tensor,
    rows: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
    threads: int | None = None,
    *,
    in_features: int | None = None,
    check_indices: bool = False,
) -> torch.Tensor:
    """y[B, rows] = act(scale * (x @ W_bands^T) + shift), or x @ W^T + bias.

    `in_features` (optional) guards against feeding the wrong layer's input; `check_indices`
    scans the read bands for out-of-range columns (O(nnz); do it once at load with
    `validate_indices` instead of on every call).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [batch, in_features] tensor, got {getattr(x, 'shape', type(x))}")
    if in_features is not None and x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, layer expects {in_features}")
    if not _ok(x, _F32):
        raise _reject(x, "x", (_F32,))
    s, t = _epilogue(rows, bias, scale, shift)
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    _native.linear(x.data_ptr(), x.shape[0], x.shape[1], *_packed(values, indices, bands), rows, s, t, relu,
                   _threads(threads), check_indices, out.data_ptr())
    return out


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    """nn.Conv2d-style int-or-pair argument."""
    if type(v) is int:
        return v, v
    p = tuple(v)
    if len(p) != 2 or not all(isinstance(e, int) for e in p):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return p  # type: ignore[return-value]


Pair = tuple[int, int]


def _conv_geometry(x: object, kernel_size: int | Pair, stride: int | Pair, padding: int | Pair) -> tuple[
        Pair, Pair, Pair, Pair]:
    """(kernel, stride, padding, output size) of a conv on ``x``, a float32 [B, C, H, W] tensor; ValueError else."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D [batch, channels, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"kernel_size/stride must be >= 1 and padding >= 0, got {kernel_size}, {stride}, {padding}")
    h, w = x.shape[2], x.shape[3]
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} with padding {ph},{pw} is smaller than the {kh}x{kw} kernel")
    if not _ok(x, _F32):
        raise _reject(x, "x", (_F32,))
    return (kh, kw), (sh, sw), (ph, pw), (oh, ow)


def packed_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bands: torch.Tensor,
    rows: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
    threads: int | None = None,
    *,
    in_channels: int | None = None,
    check_indices: bool = False,
) -> torch.Tensor:
    """Direct sparse conv (no im2col): y[B, rows, OH, OW] with the same fused epilogue as `packed_linear`.

    Columns are c*kh*kw + i*kw + j (weight.view(out, -1) order); dilation 1, groups 1.
    """
    if in_channels is not None and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels, layer expects {in_channels}")
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = _conv_geometry(x, kernel_size, stride, padding)
    b, c, h, w = x.shape
    s, t = _epilogue(rows, bias, scale, shift)
    out = torch.empty(b, rows, oh, ow, dtype=torch.float32)
    _native.conv2d(x.data_ptr(), b, c, h, w, *_packed(values, indices, bands), rows, kh, kw, sh, sw, ph, pw, s, t,
                   relu, _threads(threads), check_indices, out.data_ptr(), oh, ow)
    return out


def _grad_buffers(x: torch.Tensor, values: torch.Tensor, input_grad: bool, values_grad: bool) -> tuple[
        torch.Tensor | None, torch.Tensor | None]:
    """The gradients to fill: the input's (written whole) and the values' (zeros outside the bands read)."""
    gx = torch.empty_like(x) if input_grad else None
    gv = torch.zeros_like(values) if values_grad else None
    return gx, gv


def _checked_grad_out(grad_out: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != shape:
        raise ValueError(f"grad_out must have the output's shape {list(shape)}, got {getattr(grad_out, 'shape', type(grad_out))}")
    if not _ok(grad_out, _F32):
        raise _reject(grad_out, "grad_out", (_F32,))
    return grad_out


def packed_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bands: torch.Tensor,
    rows: int,
    *,
    input_grad: bool = True,
    values_grad: bool = True,
    threads: int | None = None,
    check_indices: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = x @ W_bands^T (no epilogue) w.r.t. x and ``values``, from dL/dy [batch, rows].

    The values' gradient has ``values``' shape and is non-zero only inside the bands passed: the sparse
    subnet's own weights, never a dense [rows, cols] matrix."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [batch, in_features] tensor, got {getattr(x, 'shape', type(x))}")
    if not _ok(x, _F32):
        raise _reject(x, "x", (_F32,))
    grad_out = _checked_grad_out(grad_out, (x.shape[0], rows))
    packed = _packed(values, indices, bands)
    gx, gv = _grad_buffers(x, values, input_grad, values_grad)
    _native.linear_backward(x.data_ptr(), x.shape[0], x.shape[1], grad_out.data_ptr(), *packed, rows,
                            _threads(threads), check_indices, 0 if gx is None else gx.data_ptr(),
                            0 if gv is None else gv.data_ptr())
    return gx, gv


def packed_conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bands: torch.Tensor,
    rows: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    *,
    input_grad: bool = True,
    values_grad: bool = True,
    threads: int | None = None,
    check_indices: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `packed_conv2d` (no epilogue) w.r.t. x and ``values``, from dL/dy [batch, rows, OH, OW]."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = _conv_geometry(x, kernel_size, stride, padding)
    b, c, h, w = x.shape
    grad_out = _checked_grad_out(grad_out, (b, rows, oh, ow))
    packed = _packed(values, indices, bands)
    gx, gv = _grad_buffers(x, values, input_grad, values_grad)
    _native.conv2d_backward(x.data_ptr(), b, c, h, w, grad_out.data_ptr(), *packed, rows, kh, kw, sh, sw, ph, pw,
                            _threads(threads), check_indices, 0 if gx is None else gx.data_ptr(),
                            0 if gv is None else gv.data_ptr(), oh, ow)
    return gx, gv


def run_plan(records: torch.Tensor, slots: torch.Tensor, batch: int, threads: int | None = None) -> None:
    """Run a compiled forward (``dress_model.native_forward``): int64 ``records`` [ops, PLAN_FIELDS] over ``slots``
    [n, 2] (data pointer, capacity in floats); the native side checks every record against the slots'
    capacities before it runs anything."""
    _check(records, "records", (torch.int64,))
    _check(slots, "slots", (torch.int64,))
    if records.dim() != 2 or records.shape[1] != PLAN_FIELDS or slots.numel() % 2:
        raise ValueError(f"records must be [ops, {PLAN_FIELDS}] and slots [n, 2], got {list(records.shape)}, "
                         f"{list(slots.shape)}")
    _native.run_plan(records.data_ptr(), records.shape[0], slots.data_ptr(), slots.numel() // 2, batch, _threads(threads))


def validate_indices(indices: torch.Tensor, bands: torch.Tensor, rows: int, cols: int, threads: int | None = None) -> None:
    """Raises ValueError if any read index is outside [0, cols) or a band overruns the buffer; run once per load."""
    _check(indices, "indices", _IDX)
    _check(bands, "bands", (torch.int64,))
    if indices.dim() != 1 or bands.dim() != 2 or bands.shape[1] != 2:
        raise ValueError(f"indices must be 1-D and bands [nb, 2], got {list(indices.shape)} and {list(bands.shape)}")
    _native.validate_indices(indices.data_ptr(), indices.shape[0], indices.dtype is torch.int32, bands.data_ptr(),
                             bands.shape[0], rows, cols, _threads(threads))


def kernel_isa() -> str:
    """The instruction set the kernels currently dispatch to ('avx512', 'avx2' or 'generic')."""
    return _native.isa()


def best_kernel_isa() -> str:
    """The best instruction set this CPU runs the kernels with (what ``set_kernel_isa(None)`` restores)."""
    return _native.best_isa()


def set_kernel_isa(name: str | None = None) -> None:
    """Forces a lower ISA (tests, A/B timing); None restores the best one this CPU supports."""
    _native.set_isa(_native.best_isa() if name is None else name)
