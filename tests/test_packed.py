"""Packed runtime: equals the masked model at every density, switches in place, refuses bad files."""

import json
import re

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from benchmarks.packed_fuzz import declaring, measured  # noqa: E402 - crafted files: the benchmark's, tried here briefly
from dress_model.models import Architecture, create_model
from dress_model.packed import PackedModel, pack_checkpoint
from dress_model.packed_checks import load_bytes
from dress_model.packed_format import (
    MAX_LOAD_BYTES,
    UNPACK_CHUNK,
    PackedFormatError,
    index_bits,
    pack_index_bits,
    packed_index_bytes,
    unpack_index_bits,
)

DENS = "1,0.5,0.25,0.1"


def trained_like(name: str, channels: int, size: int, width: int = 8):
    """A model with non-trivial weights, orders and per-density BN statistics."""
    torch.manual_seed(0)
    model = create_model(name, DENS, in_channels=channels, image_size=size, width=width)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean") and m.running_mean is not None:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.rerank()
    return model.eval()


@pytest.mark.parametrize("name,channels,size", [("cnn", 1, 28), ("resnet8", 3, 32), ("cnn", 3, 20)])
@pytest.mark.parametrize("batch", [1, 5])
def test_packed_equals_masked_model_at_every_density(name, channels, size, batch) -> None:
    model = trained_like(name, channels, size)
    packed = pack_checkpoint(model)
    x = torch.randn(batch, channels, size, size)
    for d in model.densities:
        model.set_density(d)
        packed.set_density(d)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), model(x), rtol=1e-4, atol=1e-4)


def test_switching_back_and_forth_matches_a_fresh_load(tmp_path) -> None:
    model = trained_like("resnet8", 3, 32)
    path = pack_checkpoint(model).save(tmp_path / "m.packed")
    live = PackedModel.load(path)
    x = torch.randn(2, 3, 32, 32)
    for d in (0.1, 1.0, 0.25, 0.5, 0.1, 1.0):
        live.set_density(d)
        fresh = PackedModel.load(path)
        fresh.set_density(d)
        torch.testing.assert_close(live(x), fresh(x), rtol=0, atol=0)


def test_switching_copies_no_weights() -> None:
    packed = pack_checkpoint(trained_like("cnn", 1, 28))
    pointers = {n: (l.values.data_ptr(), l.indices.data_ptr()) for n, l in packed.packed_layers()}
    for d in (0.1, 1.0, 0.5):
        packed.set_density(d)
        assert {n: (l.values.data_ptr(), l.indices.data_ptr()) for n, l in packed.packed_layers()} == pointers


def test_max_density_stores_only_needed_bands() -> None:
    model = trained_like("cnn", 1, 28)
    full, half = pack_checkpoint(model), pack_checkpoint(model, max_density=0.5)
    assert half.densities == (0.1, 0.25, 0.5)
    assert half.nbytes() == full.nbytes(0.5) < full.nbytes()
    x = torch.randn(2, 1, 28, 28)
    for d in half.densities:
        full.set_density(d)
        half.set_density(d)
        torch.testing.assert_close(half(x), full(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not one of"):
        half.set_density(1.0)


def test_bytes_shrink_with_density() -> None:
    packed = pack_checkpoint(trained_like("cnn", 1, 28))
    sizes = [packed.nbytes(d) for d in packed.densities]
    assert sizes == sorted(sizes) and sizes[0] < 0.2 * sizes[-1]


def test_to_dress_round_trip_keeps_every_subnet() -> None:
    model = trained_like("resnet8", 3, 32)
    rebuilt = pack_checkpoint(model).to_dress().eval()
    x = torch.randn(2, 3, 32, 32)
    for d in model.densities:
        model.set_density(d)
        rebuilt.set_density(d)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_full_top_band_travels_without_indices_and_runs_dense() -> None:
    """Stored up to d=1, each layer's file holds indices only for the bands below the top (the top band's are
    the columns they miss); the loaded model has every index back, and d=1 runs as a dense layer."""
    model = trained_like("cnn", 1, 28)
    packed = pack_checkpoint(model)
    tensors = load_tensors(packed.to_bytes())
    loaded = PackedModel.from_bytes(packed.to_bytes())
    for (name, layer), (_, back) in zip(packed.packed_layers(), loaded.packed_layers()):
        stored = packed_index_bytes(layer.entries(len(layer.densities) - 2), index_bits(layer.cols))
        assert layer.full_top and tensors[f"{name}.indices"].numel() == stored
        assert torch.equal(back.indices, layer.indices) and torch.equal(back.values, layer.values)
        assert back.runs_dense
    partial = pack_checkpoint(model, max_density=0.5)
    for name, layer in partial.packed_layers():
        stored = packed_index_bytes(layer.indices.numel(), index_bits(layer.cols))
        assert not layer.full_top and load_tensors(partial.to_bytes())[f"{name}.indices"].numel() == stored
    x = torch.randn(3, 1, 28, 28)
    model.set_density(1.0)
    loaded.set_density(1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    _, conv = next((n, m) for n, m in loaded.packed_layers() if m.is_conv)
    with pytest.raises(ValueError, match="channels"):  # the dense path checks its input as the kernel does
        conv(torch.randn(1, conv.in_channels + 1, 8, 8))


def test_half_precision_files_are_smaller_and_computed_in_float32() -> None:
    model = trained_like("resnet8", 3, 32)
    packed = pack_checkpoint(model)
    full, half = packed.to_bytes(), packed.to_bytes(half=True)
    assert len(half) < 0.7 * len(full)
    loaded = PackedModel.from_bytes(half)
    assert all(t.dtype == torch.float32 for t in loaded.net.state_dict().values() if t.is_floating_point())
    x = torch.randn(2, 3, 32, 32)
    for d in model.densities:
        packed.set_density(d)
        loaded.set_density(d)
        reference = packed(x)
        assert (loaded(x) - reference).abs().max() <= 1e-2 * reference.abs().max()
    name, layer = next(packed.packed_layers())
    layer.values[0] = 1e6
    with pytest.raises(ValueError, match=f"{name}.values holds values beyond float16"):
        packed.to_bytes(half=True)


def _tamper(data: bytes, edit) -> bytes:
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = load_tensors(data)
    header = json.loads(meta["dress"])
    edit(tensors, header)
    return save_tensors(tensors, metadata={"dress": json.dumps(header)})


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _edit_index(tensors, header, position, value) -> None:
    """Set the first layer's stored index ``position`` to ``value(indices, bits)``, re-packing the bits."""
    key = _first_key(tensors, ".indices")
    layer = PackedModel(Architecture.from_json(header["architecture"])).net.get_submodule(key.rpartition(".")[0])
    bits = index_bits(layer.cols)
    indices = unpack_index_bits(tensors[key], layer.stored_indices, bits, torch.int32)
    indices[position] = value(indices, bits)
    tensors[key] = pack_index_bits(indices, bits)


BAD = {
    "version": (lambda t, h: h.update(version=99), "version 99"),
    "format": (lambda t, h: h.update(format="other"), "expected 'dress-packed'"),
    "index out of range": (lambda t, h: _edit_index(t, h, 0, lambda idx, bits: 2**bits - 1), "range"),
    "duplicate column": (lambda t, h: _edit_index(t, h, 1, lambda idx, bits: idx[0]), "repeats a column"),
    "indices not bit-packed": (
        lambda t, h: t.__setitem__(_first_key(t, ".indices"), t[_first_key(t, ".indices")].to(torch.int16)),
        "bit-packed uint8",
    ),
    "top band's indices stored": (
        lambda t, h: t.__setitem__(_first_key(t, ".indices"), torch.cat([t[_first_key(t, ".indices")]] * 2)),
        "has shape",
    ),
    "wrong dtype": (lambda t, h: t.__setitem__(_first_key(t, ".values"), t[_first_key(t, ".values")].double()), "float32"),
    "short values": (lambda t, h: t.__setitem__(_first_key(t, ".values"), t[_first_key(t, ".values")][:-1].clone()), "has shape"),
    "missing tensor": (lambda t, h: t.pop(_first_key(t, ".indices")), "lacks"),
    "extra tensor": (lambda t, h: t.__setitem__("spare", torch.zeros(3)), "no place for"),
    "bn shape": (lambda t, h: t.__setitem__("bn1.running_mean", torch.zeros(2, 3)), "has shape"),
    "unknown architecture field": (lambda t, h: h["architecture"].update(depth=5), "unknown architecture fields"),
    "NaN weight": (lambda t, h: t[_first_key(t, ".values")].__setitem__(3, float("nan")), "non-finite"),
    "infinite BN scale": (lambda t, h: t["bn1.weight"].__setitem__((0, 0), float("inf")), "non-finite"),
    "density above 1": (lambda t, h: h["architecture"].update(densities=[7.0]), r"in \(0, 1\]"),
    "densities not a list": (lambda t, h: h["architecture"].update(densities="0.5"), "list of numbers"),
    "descending densities": (lambda t, h: h["architecture"].update(densities=[1.0, 0.5, 0.25, 0.1]), "ascending"),
    "width 0": (lambda t, h: h["architecture"].update(width=0), "width must be an integer"),
    "width not an integer": (lambda t, h: h["architecture"].update(width=16.5), "width must be an integer"),
    "huge image": (lambda t, h: h["architecture"].update(image_size=10**9), "image_size must be"),
    # within every limit but not what the file holds: refused from the header, before allocating ~100 MB
    "wider than the file": (lambda t, h: h["architecture"].update(width=1024), "has shape"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_packed_files_are_refused(case) -> None:
    edit, message = BAD[case]
    data = pack_checkpoint(trained_like("cnn", 1, 28)).to_bytes()
    with pytest.raises(PackedFormatError, match=message):
        PackedModel.from_bytes(_tamper(data, edit))


def test_truncated_and_missing_files_are_refused(tmp_path) -> None:
    data = pack_checkpoint(trained_like("cnn", 1, 28)).to_bytes()
    with pytest.raises(PackedFormatError):
        PackedModel.from_bytes(data[: len(data) // 2])
    with pytest.raises(PackedFormatError, match="not a packed DRESS model"):
        PackedModel.from_bytes(b"\xff" * 16)
    with pytest.raises(PackedFormatError, match="does not exist"):
        PackedModel.load(tmp_path / "missing.packed")


@pytest.mark.parametrize("cols", [1, 2, 3, 144, 256, 257, 576, 32767, 40000])
def test_indices_travel_bit_packed_with_just_enough_bits(cols: int) -> None:
    bits = index_bits(cols)
    assert 2 ** bits >= cols and (bits == 1 or 2 ** (bits - 1) < cols)
    count = 2 * UNPACK_CHUNK + 1001  # unpacked a chunk at a time
    indices = torch.randint(0, cols, (count,), generator=torch.Generator().manual_seed(cols))
    data = pack_index_bits(indices, bits)
    assert data.dtype == torch.uint8 and data.numel() == packed_index_bytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_index_bits(data, count, bits, torch.int32), indices.int())


def _refused_cheaply(load, match: str) -> None:
    """``load()`` raises PackedFormatError (``match``) within a second, resident memory never 100 MB above
    where it was (sampled while it runs: what it frees before returning counts too)."""
    raised, seconds, extra_mb = measured(load)
    assert isinstance(raised, PackedFormatError) and re.search(match, str(raised)), raised
    assert seconds < 1.0 and extra_mb < 100


CRAFTED = {  # within every architecture limit, with a header that agrees with itself: only the size gives them away
    "wide": ("cnn", dict(width=4096)),
    "many classes": ("cnn", dict(width=1024, num_classes=100_000)),
    "deep": ("resnet8", dict(name="resnet20", width=1024)),
    "huge images": ("cnn", dict(image_size=4096, in_channels=64)),
    "sparse and half": ("cnn", dict(width=2048, densities=[0.001, 0.01], half=True)),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_header_declaring_more_than_the_file_holds_is_refused_before_building(case) -> None:
    base, arch = CRAFTED[case]
    channels, size = (1, 28) if base == "cnn" else (3, 32)
    arch = dict(arch)
    half = arch.pop("half", False)
    crafted = declaring(pack_checkpoint(trained_like(base, channels, size, width=4)).to_bytes(), arch, half=half)
    assert len(crafted) < 100_000
    _refused_cheaply(lambda: PackedModel.from_bytes(crafted), "describes a larger model than it holds")


def test_a_file_holding_every_declared_byte_is_refused_past_the_cap(tmp_path) -> None:
    """A few hundred KB that do fill their header, for a model whose fc1 alone is 2 GB dense: the cap refuses it."""
    data = pack_checkpoint(trained_like("cnn", 1, 28, width=4)).to_bytes()
    crafted = declaring(data, dict(image_size=4096, densities=[0.0001]), fill=True)
    assert len(crafted) < 1_000_000
    _refused_cheaply(lambda: PackedModel.from_bytes(crafted), f"more than the {MAX_LOAD_BYTES:,} allowed")
    path = tmp_path / "crafted.packed"
    path.write_bytes(crafted)
    _refused_cheaply(lambda: PackedModel.load(path), "allowed")


def test_the_cap_can_be_lowered_and_raised(tmp_path) -> None:
    packed = pack_checkpoint(trained_like("resnet8", 3, 32))
    data = packed.to_bytes()
    with torch.device("meta"):
        needed = load_bytes(create_model(packed.arch))
    with pytest.raises(PackedFormatError, match=f"takes {needed:,} bytes of tensors, more than the {needed - 1:,}"):
        PackedModel.from_bytes(data, max_bytes=needed - 1)
    assert PackedModel.from_bytes(data, max_bytes=needed).arch == packed.arch
    path = packed.save(tmp_path / "m.packed")
    with pytest.raises(PackedFormatError, match=f"is {len(data):,} bytes, more than the 1,000"):
        PackedModel.load(path, max_bytes=1000)  # refused before reading it
    assert PackedModel.load(path, max_bytes=needed).arch == packed.arch


@pytest.mark.parametrize("name,channels,size", [("cnn", 1, 28), ("resnet8", 3, 32), ("resnet20", 3, 32)])
@pytest.mark.parametrize("half", [False, True])
def test_every_shipped_model_loads_far_below_the_cap(name, channels, size, half) -> None:
    model = create_model(name, DENS, in_channels=channels, image_size=size, width=16, num_classes=100)
    packed = pack_checkpoint(model)
    assert load_bytes(model) < MAX_LOAD_BYTES / 50
    loaded = PackedModel.from_bytes(packed.to_bytes(half=half))
    want = packed.net.state_dict()
    for key, t in loaded.net.state_dict().items():
        expected = want[key].half().float() if half and t.is_floating_point() else want[key]
        assert torch.equal(t, expected), key
