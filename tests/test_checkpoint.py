"""Checkpoints: exact round trip of every subnet; bad files refused; nothing half-written."""

import json

import pytest
import torch

from dress_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dress_model.models import create_model


def trained_like_model():
    torch.manual_seed(0)
    model = create_model("resnet8", "1,0.5,0.1", in_channels=3, image_size=32, width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.rerank()
    return model.eval()


def test_round_trip_preserves_every_subnet(tmp_path) -> None:
    model = trained_like_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"dataset": "cifar10"})
    loaded, header = load_checkpoint(path)
    assert header["meta"] == {"dataset": "cifar10"} and header["architecture"]["name"] == "resnet8"
    x = torch.randn(2, 3, 32, 32)
    for d in model.densities:
        model.set_density(d)
        loaded.set_density(d)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


def test_missing_truncated_and_foreign_files_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint(trained_like_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a DRESS checkpoint"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_tampered_order_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(trained_like_model(), tmp_path / "m.safetensors")
    header = json.loads(json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]["dress"])
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".order"))
    tensors[key][0, 0] = tensors[key][0, 1]  # no longer a permutation
    save_file(tensors, str(path), metadata={"dress": json.dumps(header)})
    with pytest.raises(CheckpointError, match="not a per-row permutation"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import dress_model.checkpoint as ckpt

    model = trained_like_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"v": 1})

    def disk_full(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(model, path, {"v": 2})
    assert load_checkpoint(path)[1]["meta"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
