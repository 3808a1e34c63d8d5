"""A 100-device fleet on Flower's simulation engine (real SuperLink, Ray, control plane) for 2 rounds."""

import json

import pytest
from typer.testing import CliRunner

from cli.fleet import app
from contracts.policy import CalibrationPoint
from contracts.profiles import assign_profiles, parse_mix
from contracts.settings import RunSettings
from coordinator.registry import DeviceStatus, Registry
from simulations.costs import reference_for
from simulations.fleet import read_calibration, write_calibration
from simulations.report import densities_per_profile, profile_table
from simulations.run import SimulationSettings, run_simulation


def test_hundred_device_simulation_fills_the_registry(tmp_path) -> None:
    run = RunSettings.defaults(num_rounds=2, fraction=0.1, width=4, max_examples=64, eval_examples=500, lr=0.04,
                               lr_decay=0.25, mix="laptop-x86=50,pi4=50", partition="profile")  # devices' data by kind
    # a saved calibration (as a run writes it) builds the fleet instead of timing the model now
    saved_calibration = tmp_path / "calibration.json"
    write_calibration(saved_calibration, run.model_label, MEASURED)
    settings = SimulationSettings(run, devices=100, run_dir=tmp_path / "run",
                                  calibration=saved_calibration)
    seen = []
    metrics = run_simulation(settings, seen.append)
    assert [r["round"] for r in seen] == [1, 2]
    assert [r["lr"] for r in seen] == [pytest.approx(0.04), pytest.approx(0.01)]  # annealed across the rounds
    assert all(len(r["participants"]) == 10 for r in seen)
    with Registry(state_dir=tmp_path / "run" / "state") as registry:
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
    run_dir = tmp_path / "run"
    assert read_calibration(run_dir / "calibration.json", run.model_label, run.density_list) == MEASURED
    for name in ("report.md", "metrics.json", "accuracy.png", "fleet.png", "bytes.png"):
        assert (run_dir / name).stat().st_size > 0, name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["devices"] == 100 and saved["rounds"] == 2
    assert {row["density"] for row in saved["accuracy"]} == {0.1, 0.25, 0.5, 1.0}
    assert metrics["peak_rss_mb"] > 0
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


def test_the_demos_fleet_is_built_from_the_shipped_reference_whatever_the_load(tmp_path) -> None:
    """The app's defaults (the demo's) have a calibration measured once on an idle machine: the fleet is built
    from it, not from timings of a machine that may be busy. Another configuration, or --measure, times this
    machine; a saved file is that file."""
    run = RunSettings.defaults()
    reference = reference_for(run)
    assert reference is not None, "no shipped calibration for the app's defaults: python -m simulations.costs"
    assert sorted(p.density for p in reference) == sorted(run.density_list)
    settings = SimulationSettings(run, run_dir=tmp_path)
    assert settings.saved == reference and settings.calibration_source.startswith("reference")
    measuring = SimulationSettings(run, run_dir=tmp_path, measure=True)
    assert measuring.saved is None and measuring.calibration_source.startswith("measured")
    assert reference_for(run.replace(width=8)) is None  # another model
    assert reference_for(run.replace(joint="all")) is None  # another training step, another cost
    assert reference_for(run.replace(method="heterofl")) is None


MEASURED = [CalibrationPoint(1.0, 0.40, 0.5, 8.0, 6.0), CalibrationPoint(0.5, 0.25, 0.3, 5.0, 4.0),
            CalibrationPoint(0.25, 0.15, 0.2, 3.5, 3.0), CalibrationPoint(0.1, 0.10, 0.1, 2.5, 2.5)]


def test_a_saved_calibration_must_be_of_the_run_model_and_densities(tmp_path) -> None:
    path = tmp_path / "calibration.json"
    run = RunSettings.defaults()
    write_calibration(path, run.model_label, MEASURED)
    assert read_calibration(path, run.model_label, run.density_list) == MEASURED
    wider = run.replace(width=32)
    with pytest.raises(ValueError, match="measured on cnn width 16 on fashion-mnist, but this run trains cnn width 32"):
        read_calibration(path, wider.model_label, wider.density_list)
    with pytest.raises(ValueError, match=r"measured densities \[0.1, 0.25, 0.5, 1.0\], but the model has \[0.5, 1.0\]"):
        read_calibration(path, run.model_label, (0.5, 1.0))
    path.write_text('{"model": "cnn width 16 on fashion-mnist", "calibration": [{"density": 2}]}')
    with pytest.raises(ValueError, match="expected a simulation's calibration.json"):
        read_calibration(path, run.model_label, run.density_list)
    with pytest.raises(ValueError, match="cannot read it"):
        read_calibration(tmp_path / "missing.json", run.model_label, run.density_list)


def test_mix_is_exact_and_deterministic() -> None:
    mix = parse_mix("pi4=40,jetson-nano=30,phone=30", ["pi4", "jetson-nano", "phone"])
    names = assign_profiles(mix, 100, seed=1)
    assert (names.count("pi4"), names.count("jetson-nano"), names.count("phone")) == (40, 30, 30)
    assert names == assign_profiles(mix, 100, seed=1) != assign_profiles(mix, 100, seed=2)


def test_densities_per_profile_count_who_trained() -> None:
    rounds = [{"participants": {"sim-000": 1.0, "sim-001": 0.1}}, {"participants": {"sim-000": 0.25, "sim-001": 0.1}}]
    profiles = {"sim-000": "laptop-x86", "sim-001": "pi4", "sim-002": "phone"}
    per_profile = densities_per_profile(rounds, profiles)
    assert per_profile == {"laptop-x86": {"1.0": 1, "0.25": 1}, "phone": {}, "pi4": {"0.1": 2}}
    assert profile_table(per_profile) == (
        ["profile", "d=1", "d=0.25", "d=0.1", "mean density"],
        [["laptop-x86", "1", "1", "0", "0.625"], ["phone", "0", "0", "0", "-"], ["pi4", "0", "0", "2", "0.100"]],
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mix", "pi4=50,toaster=50"], "unknown device profile 'toaster'"),
        (["--mix", "pi4=40,phone=40"], "sum to 100"),
        (["--mix", "pi4"], "expected PROFILE=PERCENT"),
        (["--mix", "pi4=x,phone=100"], "bad share"),
        (["--partition", "dirichlet:-1"], "dirichlet"),
        (["--densities", "1,0.5,0.5"], "repeat"),
        (["--model", "vgg"], "--model must be one of cnn"),
        (["--dataset", "imagenet"], "--dataset must be one of"),
        (["--traces", "steddy"], "unknown trace family 'steddy'"),
        (["--deadline", "0"], "--deadline must be > 0"),
        (["--calibration", "missing.json"], "--calibration missing.json: cannot read it"),
    ],
)
def test_bad_simulation_input_is_a_clear_error(tmp_path, args, message) -> None:
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_bad_trace_file_is_a_clear_error(tmp_path) -> None:
    traces = tmp_path / "traces.csv"
    traces.write_text("trace,round,available,memory_share,battery,online\na,0,2,1,,1\n")
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--traces", str(traces)])
    assert result.exit_code == 2, result.output
    assert "traces.csv:2: available must be in (0, 1], got '2'" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
