"""What centralized training reaches per task and density: the reference a fleet's report sets each tier against.

The numbers are `benchmarks/accuracy.py`'s DRESS rows (one set of weights trained on the whole training split,
judged on the whole test split), averaged over its seeds. That benchmark rewrites ``centralized.json`` whenever it
writes its results, so the two agree (a test checks it); the file ships with the package, so an installed
dress-fleet reports the gap without a checkout.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dress_model.checkpoint import atomic_write

CENTRALIZED = Path(__file__).with_name("centralized.json")
METHOD = "dress"  # the rows the reference is made of


def centralized_reference(task: str, path: Path = CENTRALIZED) -> dict[float, float]:
    """Accuracy % per density of centralized DRESS on ``task`` (``RunSettings.task``); {} where it was never
    trained centrally or the file is missing (a report then says so)."""
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        return {}
    return {float(d): float(a) for d, a in tasks.get(task, {}).get("accuracy", {}).items()}


def reference_of(rows: Iterable[Mapping[str, Any]], command: str) -> dict[str, Any]:
    """The reference file's content from `benchmarks/accuracy.py`'s rows: per task, DRESS's mean per density
    and the seeds it is the mean of."""
    by: dict[str, dict[float, dict[int, float]]] = {}
    for r in rows:
        if r["method"] == METHOD:
            by.setdefault(r["task"], {}).setdefault(float(r["density"]), {})[int(r["seed"])] = float(r["accuracy"])
    return {
        "source": "benchmarks/results/accuracy.json", "command": command,
        "tasks": {task: {"accuracy": {f"{d:g}": round(statistics.fmean(seeds.values()), 2)
                                      for d, seeds in sorted(densities.items(), reverse=True)},
                         "seeds": sorted({s for seeds in densities.values() for s in seeds})}
                  for task, densities in sorted(by.items())},
    }


def write_reference(rows: Iterable[Mapping[str, Any]], command: str, path: Path = CENTRALIZED) -> None:
    text = json.dumps(reference_of(rows, command), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
