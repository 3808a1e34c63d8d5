"""Simulated fleets: how they are built (calibrations, mixes, traces) and their input checked. The 100-device run
on Flower's simulation engine is test_wheel.py's, through the installed wheel."""


import pytest
from typer.testing import CliRunner

from cli.fleet import app
from contracts.policy import CalibrationPoint
from contracts.profiles import assign_profiles, parse_mix
from contracts.settings import RunSettings
from simulations.costs import reference_for
from simulations.fleet import read_calibration, write_calibration
from simulations.report import densities_per_profile, profile_table
from simulations.run import SimulationSettings


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
