"""An installed wheel works outside a source checkout: built from this tree, installed without its source into a
fresh virtual environment in a temporary folder, its commands answer and `dress-fleet simulate` runs a 100-device
fleet on Flower's simulation engine (real SuperLink, Ray, control plane) for 2 rounds, filling the registry. That
simulation is the suite's only 100-device one: a second run from the checkout would add half a minute to a suite
that must stay under 10 minutes, and check nothing this one does not.

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
from test_simulation import MEASURED

from contracts.settings import RunSettings
from coordinator.registry import DeviceStatus, Registry
from simulations.fleet import read_calibration, write_calibration

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

    # a saved calibration (as a run writes it) builds the fleet instead of timing the model now
    run_settings = RunSettings.defaults(width=4, mix="laptop-x86=50,pi4=50")
    saved_calibration = tmp_path / "calibration.json"
    write_calibration(saved_calibration, run_settings.model_label, MEASURED)
    run_dir = tmp_path / "sim"
    run([str(installed / "dress-fleet"), "simulate", "--devices", "100", "--rounds", "2", "--fraction", "0.1",
         "--width", "4", "--max-examples", "64", "--eval-examples", "500", "--lr", "0.04", "--lr-decay", "0.25",
         "--mix", "laptop-x86=50,pi4=50", "--partition", "profile",  # devices' data by kind
         "--calibration", str(saved_calibration), "--out", str(run_dir)], cwd=tmp_path, timeout=600)
    check_hundred_device_run(run_dir, run_settings, saved_calibration)


def check_hundred_device_run(run_dir: Path, run_settings: RunSettings, saved_calibration: Path) -> None:
    saved = json.loads((run_dir / "metrics.json").read_text())
    seen = saved["per_round"]
    assert [r["round"] for r in seen] == [1, 2]
    assert [r["lr"] for r in seen] == [pytest.approx(0.04), pytest.approx(0.01)]  # annealed across the rounds
    assert all(len(r["participants"]) == 10 for r in seen)
    with Registry(state_dir=run_dir / "state") as registry:
        devices = registry.list_devices()
        assert len(devices) == 100
        densities = {d.current_density for d in devices}
        assert densities <= {1.0, 0.5, 0.25, 0.1} and len(densities) >= 2, densities
        rounds = registry.list_rounds()
        assert [r.round for r in rounds] == [1, 2]
        assert all(len(r.participants) == 10 and r.bytes_sent > 0 and r.bytes_received > 0 for r in rounds)
        assert set(rounds[-1].metrics) == {0.1, 0.25, 0.5, 1.0}
        # devices are drawn by name (the same draw for every method), and nodes asked who they are until the
        # drawn ones are found
        bound = [d for d in devices if d.flower_node_id is not None]
        assert 10 <= len(bound) <= 100, len(bound)
        trained = {p for r in rounds for p in r.participants}
        assert trained <= {d.id for d in bound}
        assert {d.status for d in devices} == {DeviceStatus.OFFLINE}  # the virtual fleet left with the run
        # each device registered the saved costs scaled by its profile's speed (laptop-x86 1, pi4 0.08)
        laptop = next(d for d in devices if d.profile == "laptop-x86")
        pi4 = next(d for d in devices if d.profile == "pi4")
        assert list(laptop.calibration) == MEASURED
        assert [p.latency_ms for p in pi4.calibration] == pytest.approx([p.latency_ms / 0.08 for p in MEASURED])
    assert read_calibration(run_dir / "calibration.json", run_settings.model_label, run_settings.density_list) \
        == MEASURED
    for name in ("report.md", "metrics.json", "accuracy.png", "fleet.png", "bytes.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert saved["devices"] == 100 and saved["rounds"] == 2
    assert {row["density"] for row in saved["accuracy"]} == {0.1, 0.25, 0.5, 1.0}
    assert saved["peak_rss_mb"] > 0
    beats = saved["heartbeats"]  # every device heartbeats at start and after round 1 at least, none lost
    assert beats["answered"] >= 2 * 100 and beats["lost"] == 0 and 0 < beats["p50_ms"] <= beats["p99_ms"]
    # profile-true budgets: against one deadline the reference laptop trains denser subnets than a Pi 4
    profiles = saved["profiles"]
    assert set(profiles) == {"laptop-x86", "pi4"} and sum(sum(c.values()) for c in profiles.values()) == 20
    mean = {name: sum(float(d) * n for d, n in c.items()) / sum(c.values()) for name, c in profiles.items()}
    assert mean["laptop-x86"] > mean["pi4"] and profiles["laptop-x86"].get("1.0", 0) > 0, profiles
    report = (run_dir / "report.md").read_text()
    assert "## Densities trained per profile" in report
    assert f"Device costs: saved: {saved_calibration}" in report and saved["calibration_source"].startswith("saved")
    # bytes to a device shrink with its density
    down = {row["density"]: row["down"] for row in saved["bytes"]}
    assert sorted(down, key=down.get) == sorted(down)
