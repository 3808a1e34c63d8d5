"""Where a simulated fleet's device costs come from: a reference shipped with the package, or this machine timed.

A virtual device's costs are a calibration — the run's model timed on the reference laptop-x86 — scaled by its
profile's speed, and which densities a device affords follows from them. Timed on the host at the start of each
run, a busy host built another fleet from the same command (the demo under load trained only d=1 and d=0.5).
So the costs of the configurations people run without thinking (the demo's: the app's defaults) were measured
once on an idle machine and ship here; `simulate` builds its fleet from the one that matches the run, and times
the host only for a configuration that has none, or when asked (`--measure`). The report says which.

    python -m simulations.costs          # on an idle machine: measure the references again and rewrite the file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from agent.calibration import calibrate
from contracts.methods import get_method
from contracts.policy import CalibrationPoint
from contracts.settings import RunSettings, build_run_model
from dress_model.checkpoint import atomic_write
from dress_model.models import create_model
from dress_model.packed import pack_checkpoint

REFERENCE = Path(__file__).with_name("reference_calibration.json")
CONFIGURATIONS = (RunSettings.defaults(),)  # the demo's fleet: the app's defaults


def key_of(run: RunSettings) -> dict[str, Any]:
    """What a calibration depends on: the method, its model, the rule a DRESS step trains by, the densities."""
    return {"method": run.method, "model": run.model_label, "joint": run.joint if run.method == "dress" else "",
            "densities": list(run.density_list)}


def reference_for(run: RunSettings, path: Path = REFERENCE) -> list[CalibrationPoint] | None:
    """The shipped calibration of ``run``'s configuration, densest first; None when none was measured for it."""
    if not path.is_file():
        return None
    for entry in json.loads(path.read_text())["references"]:
        if entry["key"] == key_of(run):
            return [CalibrationPoint(**point) for point in entry["calibration"]]
    return None


def measure_calibration(run: RunSettings) -> list[CalibrationPoint]:
    """The run's model timed on this machine (the reference laptop-x86), as an agent calibrates: DRESS's packed
    model, or a peer's own width model training as that method does, so each method's fleet gets the tiers its
    own model affords."""
    model = create_model(run.architecture())
    shape = (model.arch.in_channels, model.arch.image_size, model.arch.image_size)
    if run.method == "dress":
        return calibrate(pack_checkpoint(model), shape, joint=run.joint)
    return calibrate(build_run_model(run), shape, method=get_method(run.method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REFERENCE)
    args = parser.parse_args()
    references = []
    for run in CONFIGURATIONS:
        points = measure_calibration(run)
        references.append({"key": key_of(run), "calibration": [dataclasses.asdict(p) for p in points]})
        print(f"{run.method} {run.model_label}: " + ", ".join(f"d={p.density:g} {p.latency_ms:.3f} ms / train "
                                                               f"{p.train_ms:.1f} ms" for p in points))
    text = json.dumps({"measured_on": "laptop-x86 (the reference profile), idle", "references": references},
                      indent=2)
    atomic_write(args.out, lambda tmp: tmp.write_text(text + "\n"))


if __name__ == "__main__":
    main()
