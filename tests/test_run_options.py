"""Every run setting declared with an option is on both commands, with its declared help, and its value reaches
the run config the ServerApp and ClientApp read — with nothing written for it but its declaration."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from cli.fleet import app
from cli.run_options import options, with_run_options
from contracts.settings import RunSettings

# A valid value other than the default, for each text setting (a new one must say what to try here).
OTHER_TEXT = {"method": "heterofl", "densities": "1,0.5", "model": "resnet8", "dataset": "mnist",
              "data_dir": "/srv/data", "partition": "dirichlet:0.3", "mix": "pi4=100", "aggregation": "median",
              "joint": "band"}
# What a setting needs beside it to be valid at another value (an anchor only with a rule that takes one).
WITH = {"distill": ["--joint", "all"]}

probe = typer.Typer()


@probe.command()
@with_run_options
def show(run: RunSettings, own: int = 0) -> None:
    """Prints the run config it was given, as the coordinator would submit it."""
    print(json.dumps({"config": run.to_run_config(), "own": own}))


def other_value(name: str) -> tuple[list[str], object]:
    """Command-line words setting ``name`` to a value other than its default, and that value."""
    field = {f.name: f for f, _ in RunSettings.declared()}[name]
    flag = options()[name]
    if field.type == "bool":
        on, off = flag.split("/")
        return [off if field.default else on], not field.default
    if field.type == "str":
        return [flag, OTHER_TEXT[name]], OTHER_TEXT[name]
    value = field.default + 1 if field.type == "int" else (field.default / 2 or 0.5)
    return [flag, str(value)], value


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("command", [["simulate"], ["coordinator", "start"]])
def test_both_commands_offer_every_declared_setting(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "Run settings" in text
    for f, declared in RunSettings.declared():
        if declared.option is not None:
            assert options()[f.name].split("/")[0] in text, f"{f.name} is not on `{' '.join(command)}`"
            assert declared.help[:40] in text


@pytest.mark.parametrize("name", sorted(options()))
def test_an_option_reaches_the_run_config(name: str) -> None:
    words, value = other_value(name)
    result = CliRunner().invoke(probe, [*words, *WITH.get(name, []), "--own", "3"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    config = shown["config"]
    key = name.replace("_", "-")
    assert config[key] == value if name != "densities" else config[key] == "1,0.5"
    assert shown["own"] == 3  # the command's own options still reach it
    assert getattr(RunSettings.from_run_config(config), name) == value  # what the ServerApp and ClientApp read


def test_an_option_out_of_range_is_refused_by_its_name() -> None:
    result = CliRunner().invoke(probe, ["--rounds", "0"])
    assert result.exit_code != 0
    assert "--rounds must be an integer >= 1, got 0" in plain(result.output)
    result = CliRunner().invoke(probe, ["--partition", "dirichlet:-1"])
    assert result.exit_code != 0 and "--partition" in plain(result.output)


def test_a_command_may_not_redeclare_a_run_setting() -> None:
    def clashing(run: RunSettings, lr: float = 0.1) -> None: ...

    with pytest.raises(TypeError, match="lr"):
        with_run_options(clashing)
