"""An installed wheel works outside a source checkout: built from this tree, installed without its source into a
fresh virtual environment in a temporary folder, its commands answer and a 2-device simulation runs a round.

The fresh environment takes the dependencies (torch, Ray, ...) from this one's site-packages by a path entry,
which does not process this environment's own ``.pth`` files, so the editable install of the checkout is not
seen: every module of ours comes from the wheel. Flower is installed into it as well, for console scripts that
run its python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel of this tree: its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # build/ keeps the compiled kernel between runs (ignored by git): only a first build compiles it
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp / "dist")], cwd=ROOT,
        timeout=600)
    (wheel,) = (tmp / "dist").glob("dress_fleet-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Flower itself too (no dependencies): its console scripts (flower-superlink, ...) must run this venv's python
    flower = f"flwr=={metadata.version('flwr')}"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed",
         str(wheel), flower], cwd=tmp)
    return env_dir / "bin"


@pytest.mark.timeout(900)
def test_the_installed_wheel_runs_outside_a_checkout(installed: Path, tmp_path: Path) -> None:
    where = run([str(installed / "python"), "-c", "import contracts.settings as s, dress_model.kernels as k; "
                 "print(s.APP_DIR); print(k.__file__)"], cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(installed.parent) for p in where), where  # ours, from the wheel
    assert (Path(where[0]) / "pyproject.toml").is_file()  # the Flower app ships in the package

    assert "simulate" in run([str(installed / "dress-fleet"), "--help"], cwd=tmp_path).stdout
    assert "--superlink" in run([str(installed / "dress-agent"), "join", "--help"], cwd=tmp_path).stdout

    out = tmp_path / "sim"
    run([str(installed / "dress-fleet"), "simulate", "--devices", "2", "--rounds", "1", "--fraction", "1",
         "--max-examples", "32", "--eval-examples", "200", "--traces", "constant", "--out", str(out)],
        cwd=tmp_path, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == 1
    assert len(metrics["per_round"][0]["participants"]) >= 1
