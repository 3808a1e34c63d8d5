"""Fuzzed and crafted packed files: what a stranger's bytes do to the packed loader. A spoilt file (header edited,
bytes flipped, cut, garbage) must load and run or be refused with ``PackedFormatError``, never crash or hang; a
crafted one (a consistent header declaring a model far past any shipped) must be refused quickly and before the
loader allocates what it declares. Part of benchmarks/reliability.py.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import peak_rss_above_idle
from contracts.settings import RunSettings, build_run_model
from dress_model.models import Architecture
from dress_model.packed import PackedModel, pack_checkpoint
from dress_model.packed_format import PackedFormatError, index_bits, packed_index_bytes

HANG_S = 5.0  # a probe that takes longer than this hung: a crash


def _mutations(rng: random.Random, data: bytes) -> Callable[[], bytes]:
    """One random way to spoil a packed file: its header's JSON edited, bytes flipped, cut, or garbage."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])

    def with_header(edit: Callable[[dict], None]) -> bytes:
        h = json.loads(json.dumps(header))
        edit(h)
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n :]

    def edit_architecture(h: dict) -> None:
        arch = json.loads(h["__metadata__"]["dress"])
        key = rng.choice(["width", "image_size", "in_channels", "num_classes", "densities", "name", "bn_affine"])
        arch["architecture"][key] = rng.choice([0, -1, 7.0, 10**9, 2**31, "x", None, [], [7.0], [0.5, 0.1],
                                                [float("nan")], 1024, 3.5, True])
        h["__metadata__"]["dress"] = json.dumps(arch)

    def edit_tensor(h: dict) -> None:
        key = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(["shape", "dtype", "data_offsets"])
        h[key][field] = rng.choice([[0], [10**12], [-1], [3, 3], "F64", "I8", "BOOL", [0, 10**12], [5, 2], []])

    def flip() -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)

    choices: list[Callable[[], bytes]] = [
        lambda: with_header(edit_architecture),
        lambda: with_header(edit_tensor),
        flip,
        lambda: data[: rng.randrange(len(data))],
        lambda: rng.randbytes(rng.randrange(1, 4096)),
        lambda: struct.pack("<Q", rng.choice([0, 2**63, len(data)])) + data[8:],
    ]
    return rng.choice(choices)


def packed_model(seed: int) -> bytes:
    """A small fleet model's packed bytes, seeded."""
    torch.manual_seed(seed)
    return pack_checkpoint(build_run_model(RunSettings.defaults(width=4))).to_bytes()


def fuzz_packed(count: int, seed: int) -> dict[str, Any]:
    """Load ``count`` spoilt packed files; whatever loads must also run every subnet."""
    rng = random.Random(seed)
    data = packed_model(seed)
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    image = torch.randn(2, 1, 28, 28)
    for _ in range(count):
        spoilt = _mutations(rng, data)()
        start = time.perf_counter()
        try:
            packed = PackedModel.from_bytes(spoilt, "fuzzed")
            for density in packed.densities:
                packed.set_density(density)
                packed(image)
            outcomes["loaded"] += 1
        except PackedFormatError:
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is what this benchmark looks for
            outcomes["crashed"] += 1
            crashes.append(f"{type(e).__name__}: {e}"[:200])
        if time.perf_counter() - start > HANG_S:
            outcomes["hung"] += 1
    return {"tried": count, "crashes": outcomes["crashed"] + outcomes["hung"], "refused": outcomes["refused"],
            "loaded": outcomes["loaded"], "examples": crashes[:5]}


CRAFTED_DENSITIES = ([0.1, 0.25, 0.5, 1.0], [1.0], [0.5, 1.0], [0.01, 0.1], [0.001], [0.0001])
FILL_BYTES = 16 * 2**20  # a crafted file carries every byte its header declares when they come to at most this


def declaring(data: bytes, changes: dict[str, Any], half: bool = False, fill: bool = False) -> bytes:
    """``data`` (a real packed file) with ``changes`` in its header's architecture and a tensor table that agrees
    with them (every shape, dtype and offset), over the file's own tensor bytes, or, when ``fill`` and they come to
    at most ``FILL_BYTES``, over zeros filling every byte the table declares: only the size gives it away."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["dress"])
    header["architecture"].update(changes)
    with torch.device("meta"):
        packed = PackedModel(Architecture.from_json(header["architecture"]))
    tensors = {k: t for k, t in packed.net.state_dict().items() if not k.endswith(".bands")}
    for name, layer in packed.packed_layers():
        tensors[f"{name}.indices"] = torch.empty(packed_index_bytes(layer.stored_indices, index_bits(layer.cols)),
                                                 dtype=torch.uint8, device="meta")
    table, offset = {"__metadata__": {"dress": json.dumps(header)}}, 0
    for key, t in sorted(tensors.items()):
        dtype, size = {torch.float32: ("F16", 2) if half else ("F32", 4), torch.uint8: ("U8", 1),
                       torch.int64: ("I64", 8)}[t.dtype]
        table[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * size]}
        offset += t.numel() * size
    raw = json.dumps(table).encode()
    return struct.pack("<Q", len(raw)) + raw + (bytes(offset) if fill and offset <= FILL_BYTES else data[8 + n :])


def _crafted(rng: random.Random, bases: dict[str, bytes]) -> bytes:
    """A real small model's file declaring a model far past every one this project ships, along one of the axes
    a header controls: width, classes, image size (the CNN's classifier input) or depth (resnet8 as resnet20)."""
    name = rng.choice(sorted(bases))
    changes: dict[str, Any] = {"width": rng.choice([1024, 2048, 4096]), "densities": rng.choice(CRAFTED_DENSITIES)}
    axis = rng.choice(["width", "classes", "images" if name == "cnn" else "depth"])
    if axis == "classes":
        changes.update(width=rng.choice([256, 1024]), num_classes=rng.choice([10_000, 100_000]))
    elif axis == "images":
        changes.update(width=rng.choice([4, 16, 64]), image_size=4096)
    elif axis == "depth" and name == "resnet8":
        changes["name"] = "resnet20"
    return declaring(bases[name], changes, half=rng.random() < 0.5, fill=rng.random() < 0.5)


def measured(load: Callable[[], object]) -> tuple[BaseException | None, float, float]:
    """(what ``load`` raised, its seconds, MB it took the resident memory above where it was, sampled while it
    ran: what it frees before returning counts too)."""
    start, raised = time.perf_counter(), None
    with peak_rss_above_idle() as extra_mb:
        try:
            load()
        except Exception as e:  # noqa: BLE001 - what it raised is the measurement
            raised = e
        seconds = time.perf_counter() - start
    return raised, seconds, extra_mb[0]


def packed_crafted(count: int, seed: int) -> dict[str, Any]:
    """Load ``count`` crafted packed files (``_crafted``) in this process: each must be refused with
    PackedFormatError quickly and before the loader allocates what its header declares."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    bases = {name: pack_checkpoint(build_run_model(RunSettings.defaults(width=4, model=name, dataset=dataset)))
             .to_bytes() for name, dataset in (("cnn", "fashion-mnist"), ("resnet8", "cifar10"), ("resnet20", "cifar10"))}
    refused, max_s, max_mb, examples = 0, 0.0, 0.0, []
    for _ in range(count):
        crafted = _crafted(rng, bases)
        raised, seconds, mb = measured(lambda: PackedModel.from_bytes(crafted, "crafted"))
        refused += isinstance(raised, PackedFormatError)
        if not isinstance(raised, PackedFormatError):
            examples.append("loaded" if raised is None else f"{type(raised).__name__}: {raised}"[:200])
        max_s, max_mb = max(max_s, seconds), max(max_mb, mb)
    return {"tried": count, "refused": refused, "max_extra_mb": round(max_mb, 1), "max_s": round(max_s, 4),
            "examples": examples[:5]}
