"""Run settings: declared once, the Flower app's config made from them, a faithful run-config round trip."""

from __future__ import annotations

import re
import tomllib

import pytest
from typer.testing import CliRunner

from cli.fleet import app
from contracts.settings import (
    APP_CONFIG,
    HEARTBEATS_PER_S,
    RunSettings,
    SettingsError,
    app_config_table,
    heartbeat_period_s,
    stale_after,
)
from dress_model.models import create_model
from dress_model.sparsity import DEFAULT_DENSITIES, parse_densities


def test_the_flower_apps_config_is_the_declared_defaults() -> None:
    """Flower keeps only the keys its app lists: the shipped app lists every setting, with its declared default
    (`python -m contracts.settings` prints the table)."""
    with open(APP_CONFIG, "rb") as f:
        flwr_app = tomllib.load(f)["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": "coordinator.server_app:app", "clientapp": "agent.client_app:app"}
    assert APP_CONFIG.read_text().endswith(app_config_table()), "regenerate with `python -m contracts.settings`"
    config = flwr_app["config"]
    assert set(config) == set(RunSettings.defaults().to_run_config())
    assert RunSettings.from_run_config(config) == RunSettings()
    assert parse_densities(RunSettings().densities) == DEFAULT_DENSITIES  # "" in the app config: the method's list


def test_run_config_round_trip() -> None:
    settings = RunSettings.defaults(num_rounds=3, densities="1,0.25", partition="dirichlet:0.3", lr=0.1)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    assert settings.density_list == (0.25, 1.0)
    assert create_model(settings.architecture()).densities == (0.25, 1.0)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_rounds": 0}, "num-rounds must be an integer >= 1"),
    ({"fraction": 0.0}, "fraction must be a number in (0, 1]"),
    ({"model": "vgg"}, "model must be one of cnn"),
    ({"dataset": "imagenet"}, "dataset must be one of"),
    ({"densities": "1,0.5,0.5"}, "repeat"),
    ({"partition": "dirichlet:-1"}, "dirichlet"),
    ({"server_momentum": 1.0}, "server-momentum must be a number in [0, 1)"),
    ({"aggregation": "mode"}, "aggregation must be mean, median or trimmed-mean:BETA"),
    ({"aggregation": "trimmed-mean:0.5"}, "BETA in (0, 0.5)"),
    ({"aggregation": "trimmed-mean"}, "BETA in (0, 0.5)"),
    ({"aggregation": "median", "method": "heterofl"}, "aggregation median is DRESS's; heterofl"),
])
def test_bad_settings_name_the_setting(change: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        RunSettings.defaults(**change)


def test_a_run_config_with_unknown_missing_or_mistyped_keys_is_refused() -> None:
    config = RunSettings.defaults().to_run_config()
    with pytest.raises(SettingsError, match="unknown keys \\['colour'\\]"):
        RunSettings.from_run_config({**config, "colour": "red"})
    with pytest.raises(SettingsError, match="missing keys \\['seed'\\]"):
        RunSettings.from_run_config({k: v for k, v in config.items() if k != "seed"})
    with pytest.raises(SettingsError, match="num-rounds must be int"):
        RunSettings.from_run_config({**config, "num-rounds": "3"})
    assert RunSettings.from_run_config({**config, "lr": 1}).lr == 1.0  # TOML writes 1 for 1.0


def test_cli_version_and_registry_errors(tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("dress-fleet ")
    result = runner.invoke(app, ["devices", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no registry in" in result.output
    assert not (tmp_path / "none").exists()  # looking does not create an empty registry
    help_text = " ".join(runner.invoke(app, ["simulate", "--help"]).output.split())
    for name in ("pi4", "jetson-nano", "laptop-x86", "fashion-mnist", "cifar10", "resnet20", "--data-dir"):
        assert name in help_text


def test_a_device_is_stale_after_six_periods_which_grow_with_a_large_fleet_and_the_period_is_checked() -> None:
    assert stale_after(10.0, devices=100).total_seconds() == 60.0  # a small fleet: the setting
    assert heartbeat_period_s(5.0, devices=HEARTBEATS_PER_S * 5) == 5.0  # up to the rate: still the setting
    # 10,000 devices at 5 s would be 2,000 heartbeats a second: the period grows to keep HEARTBEATS_PER_S
    assert heartbeat_period_s(5.0, devices=10_000) == pytest.approx(10_000 / HEARTBEATS_PER_S)
    assert stale_after(5.0, devices=10_000).total_seconds() == pytest.approx(6 * 10_000 / HEARTBEATS_PER_S)
    with pytest.raises(SettingsError, match="heartbeat-s must be a number of seconds in"):
        RunSettings.defaults(heartbeat_s=0.0)


def test_the_learning_rate_anneals_over_the_rounds_to_lr_decay() -> None:
    settings = RunSettings.defaults(num_rounds=50, lr=0.08, lr_decay=0.1)
    rates = [settings.lr_at(r) for r in range(1, 51)]
    assert rates[0] == pytest.approx(0.08) and rates[-1] == pytest.approx(0.008)
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never back up
    assert rates[24] == pytest.approx(0.08 * (0.1 + 0.9 * 0.5), rel=0.05)  # cosine: about halfway at mid-run
    assert RunSettings.defaults(num_rounds=1).lr_at(1) == RunSettings.defaults().lr  # a one-round run: lr itself
    constant = RunSettings.defaults(num_rounds=9, lr_decay=1.0)
    assert {constant.lr_at(r) for r in range(1, 10)} == {constant.lr}
    for bad in (0.0, 1.5):
        with pytest.raises(SettingsError, match="lr-decay must be a number in"):
            RunSettings.defaults(lr_decay=bad)


def test_the_anchor_weight_can_anneal_over_the_rounds_too() -> None:
    settings = RunSettings.defaults(num_rounds=30, joint="all", distill=0.5, distill_decay=0.0)
    weights = [settings.distill_at(r) for r in range(1, 31)]
    assert weights[0] == pytest.approx(0.5) and weights[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(weights, weights[1:]))
    constant = RunSettings.defaults(num_rounds=9, joint="all", distill=0.5, distill_decay=1.0)
    assert {constant.distill_at(r) for r in range(1, 10)} == {constant.distill}
    with pytest.raises(SettingsError, match="distill-decay must be a number in"):
        RunSettings.defaults(distill_decay=1.5)


def test_the_joint_rule_is_checked_with_the_anchor_it_excludes() -> None:
    assert RunSettings.defaults(joint="sandwich", distill=0.0).joint == "sandwich"
    with pytest.raises(SettingsError, match="joint must be one of all, sum, band, sandwich, own, ends"):
        RunSettings.defaults(joint="every")
    with pytest.raises(SettingsError, match="distill must be 0 with joint sandwich"):
        RunSettings.defaults(joint="sandwich", distill=0.5)
    with pytest.raises(SettingsError, match="distill must be 0 with joint own-drawn"):
        RunSettings.defaults(joint="own-drawn", distill=0.5)
    assert RunSettings.defaults(joint="own", distill=0.5).distill == 0.5  # a device's own subnet, anchored


def test_the_mix_is_checked_and_names_every_partitions_profile() -> None:
    settings = RunSettings.defaults(mix="pi4=50,phone=50", seed=2)
    groups = settings.partition_groups(10)
    assert sorted(groups) == ["phone"] * 5 + ["pi4"] * 5 and groups == settings.partition_groups(10)
    with pytest.raises(SettingsError, match="sum to 100"):
        RunSettings.defaults(mix="pi4=50")
    with pytest.raises(SettingsError, match="unknown device profile 'toaster'"):
        RunSettings.defaults(mix="toaster=100")
