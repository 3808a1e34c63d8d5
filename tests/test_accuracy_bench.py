"""The centralized accuracy benchmark resumes into one file: a resume that runs another seed keeps the earlier
runs and names every task and seed its rows hold (the centralized reference averages over exactly those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def accuracy(out: Path, *args: str) -> dict:
    subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--tasks", "fashion-mnist-cnn-w3", "--methods",
                    "dress", "--densities", "1,0.1", "--epochs", "0.005", "--out", str(out), *args],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_a_resume_with_another_seed_keeps_the_first_and_lists_both(tmp_path: Path) -> None:
    out = tmp_path / "accuracy.json"
    first = accuracy(out, "--seeds", "0")
    assert {(r["seed"], r["density"]) for r in first["rows"]} == {(0, 1.0), (0, 0.1)}
    both = accuracy(out, "--seeds", "1", "--resume")
    assert both["rows"][:2] == first["rows"]  # the first seed's runs kept, not re-trained
    assert {(r["seed"], r["density"]) for r in both["rows"]} == {(0, 1.0), (0, 0.1), (1, 1.0), (1, 0.1)}
    assert both["seeds"] == [0, 1] and both["tasks"] == ["fashion-mnist-cnn-w3"]
    assert "| 0,1 |" in (tmp_path / "accuracy.md").read_text()  # each cell a mean over both seeds
