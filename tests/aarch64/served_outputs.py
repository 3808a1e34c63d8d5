"""The agent's served model on two machines: `make` (on x86) packs models the fleet ships and records what Predict
answers at every density; `check` (on aarch64) loads the same packed files the way an agent does and compares.

    python served_outputs.py make DIR     # DIR gets <model>.packed and <model>.expected.safetensors
    python served_outputs.py check DIR    # exit 1, naming each model and density that differs; DIR/check.json

A packed file is the one format the coordinator stores and sends, so this is the path a Raspberry Pi's answer
takes: bytes -> PackedModel.from_bytes -> ServedModel.predict at the assigned density. The weights are seeded
and the inputs fixed; x86 (AVX-512/AVX2) and aarch64 (NEON) sum in different orders, hence a tolerance.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agent.served_model import ServedModel
from dress_model.models import architecture_for_dataset, create_model
from dress_model.packed import PackedModel, pack_checkpoint

# The fleet's default model and the deeper one; each at batch 1 (a Predict) and 8 (the compiled batch path).
MODELS = {"cnn": ("cnn", 16), "resnet8": ("resnet8", 8)}
DENSITIES = "1,0.5,0.25,0.1"
BATCHES = (1, 8)
RTOL, ATOL = 1e-4, 1e-4  # these logits are ~0.1-0.3, a neighbouring density's differ by >= 0.03


def _inputs(packed: PackedModel) -> dict[str, torch.Tensor]:
    shape = (packed.arch.in_channels, packed.arch.image_size, packed.arch.image_size)
    generator = torch.Generator().manual_seed(7)
    return {f"x_b{batch}": torch.randn((batch, *shape), generator=generator) for batch in BATCHES}


def _answers(packed: PackedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What Predict returns for each density and batch, keyed ``d<density>_b<batch>``."""
    served = ServedModel(packed, assigned_density=max(packed.densities))
    out = {}
    for batch in BATCHES:
        x = inputs[f"x_b{batch}"]
        for density in packed.densities:
            served.set_density(density)
            logits, answered, _ = served.predict(x)
            assert answered == density, (answered, density)
            out[f"d{density}_b{batch}"] = logits.detach().clone()
    return out


def make(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, (name, width) in MODELS.items():
        torch.manual_seed(0)
        model = create_model(architecture_for_dataset(name, DENSITIES, "fashion-mnist", width))
        packed = pack_checkpoint(model)
        (folder / f"{key}.packed").write_bytes(packed.to_bytes())
        # answers from the bytes, as an agent loads them, so both sides start from the same file
        loaded = PackedModel.from_bytes((folder / f"{key}.packed").read_bytes())
        inputs = _inputs(loaded)
        answers = _answers(loaded, inputs)
        save_file(inputs | answers, str(folder / f"{key}.expected.safetensors"))
        print(f"{key}: {len(answers)} answers recorded on {platform.machine()}")


def check(folder: Path) -> int:
    failures, worst = 0, 0.0
    for key in MODELS:
        expected = load_file(str(folder / f"{key}.expected.safetensors"))
        inputs = {name: x for name, x in expected.items() if name.startswith("x_")}
        got = _answers(PackedModel.from_bytes((folder / f"{key}.packed").read_bytes(), source=key), inputs)
        for name, want in expected.items():
            if name in inputs:
                continue
            diff = (got[name] - want).abs().max().item()
            worst = max(worst, diff / want.abs().max().item())
            ok = torch.allclose(got[name], want, rtol=RTOL, atol=ATOL)
            failures += not ok
            print(f"{key} {name}: max |aarch64 - x86| = {diff:.2e} {'ok' if ok else 'DIFFERS'}")
    print(f"{failures} of the answers differ beyond rtol {RTOL}, atol {ATOL} on {platform.machine()}")
    (folder / "check.json").write_text(json.dumps({
        "machine": platform.machine(), "answers_differing": failures, "agent_outputs_match": not failures,
        "max_rel_err": worst, "rtol": RTOL, "atol": ATOL}))
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        sys.exit(check(Path(sys.argv[2])))
