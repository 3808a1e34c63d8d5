"""Training checkpoints: one safetensors file whose JSON header holds the architecture and metadata.

The tensors are the model's state dict: weights, each sparse layer's per-row ``order`` (int32) and the
per-density BN statistics, so every subnet is recoverable from the one file. Writes go to a temp file that
is renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dress_model.models import Architecture, DressModel, create_model

FORMAT = "dress-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not a DRESS checkpoint."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever reads the file next
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: DressModel, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, "architecture": model.arch.to_json(), "meta": meta or {}}
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"dress": json.dumps(header)}))
    return path


def dress_header(data: bytes, source: str, fmt: str, version: int, error: type[ValueError], what: str) -> dict[str, Any]:
    """The 'dress' JSON a safetensors file carries in its metadata, checked for format and version.

    Checkpoints and packed models share this; ``error`` and ``what`` make the message theirs.
    """
    try:
        n = int.from_bytes(data[:8], "little")
        if not 0 < n <= len(data) - 8:
            raise ValueError(f"header length {n} does not fit a {len(data)}-byte file")
        header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["dress"])
    except (ValueError, KeyError, TypeError) as e:
        raise error(f"{source} is not a {what} (safetensors with a 'dress' header): {e}") from None
    if header.get("format") != fmt:
        raise error(f"{source} has format {header.get('format')!r}, expected {fmt!r}")
    if header.get("version") != version:
        raise error(f"{source} is {what} version {header.get('version')}, this build reads {version}")
    return header


def read_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `dress-fleet train --out DIR`")
    return dress_header(path.read_bytes(), str(path), FORMAT, VERSION, CheckpointError, "DRESS checkpoint")


def load_checkpoint(path: str | Path) -> tuple[DressModel, dict[str, Any]]:
    """Rebuild the model from the header and load its tensors; any mismatch is a CheckpointError."""
    header = read_header(path)
    try:
        model = create_model(Architecture.from_json(header["architecture"]))
        tensors = load_file(str(path))
        model.load_state_dict(tensors, strict=True)
    except (SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} does not match its declared architecture: {e}") from None
    for name, layer in model.sparse_layers():
        order = layer.order.long()
        expected = torch.arange(layer.cols).expand_as(order)
        if not torch.equal(order.sort(dim=1).values, expected):
            raise CheckpointError(f"{path}: {name}.order is not a per-row permutation of 0..{layer.cols - 1}")
    model.eval()
    return model, header
