"""`devices`, `devices show ID` and `db upgrade`, mounted the way coordinator/cli.py mounts them."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from rich.console import Console
from sqlalchemy import text
from typer.testing import CliRunner

from cli.common import safe_text
from cli.registry import db_app, devices_app
from contracts.policy import Budget, CalibrationPoint
from coordinator.registry import Registry
from coordinator.registry.engine import make_engine
from coordinator.registry.errors import InvalidInputError
from coordinator.registry.migrate import head_revision

app = typer.Typer()
app.add_typer(devices_app, name="devices")
app.add_typer(db_app, name="db")
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def state_dir(tmp_path: Path, calibration: list[CalibrationPoint]) -> Path:
    state = tmp_path / "state"
    with Registry(state_dir=state) as registry:
        pi = registry.register_device("pi-kitchen", "pi4", calibration).device_id
        registry.add_model_version("v7", "/ckpt/v7", [1.0, 0.5])
        registry.heartbeat(pi, Budget(60, 500, 0.5), {0.5: (3, 6.0, 2.5), 0.25: (1, 1.0, 0.9)})
        registry.heartbeat(pi, Budget(60, 500, 0.5), {0.5: (2, 5.0, 1.8)})  # what Predict ran between heartbeats
        registry.register_device("phone-anna", "phone", calibration)
    return state


def _id(state: Path, name: str) -> int:
    """Device ids are random: look one up by name, as an operator reads it off `devices`."""
    with Registry(state_dir=state) as registry:
        return next(d.id for d in registry.list_devices() if d.name == name)


def test_devices_lists_the_fleet(state_dir: Path) -> None:
    result = runner.invoke(app, ["devices", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    assert "2 devices" in result.output
    lines = result.output.splitlines()
    [pi] = [line for line in lines if "pi-kitchen" in line]
    assert all(cell in pi for cell in ("pi4", "online", "0.5", "60 ms, 500 MB, battery 50%"))
    [phone] = [line for line in lines if "phone-anna" in line]
    assert all(cell in phone for cell in ("phone", "0.1", " - "))


def test_devices_accepts_a_database_url(state_dir: Path) -> None:
    url = f"sqlite:///{state_dir / 'registry.sqlite3'}"
    result = runner.invoke(app, ["devices", "--db", url])
    assert result.exit_code == 0 and "pi-kitchen" in result.output


def test_devices_show_prints_the_assignment_history(state_dir: Path) -> None:
    pi = str(_id(state_dir, "pi-kitchen"))
    result = runner.invoke(app, ["devices", "show", pi, "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "registration" in line or "budget_change" in line]
    assert len(rows) == 2
    assert "0.25" in rows[0] and "registration" in rows[0]
    assert "0.5" in rows[1] and "budget_change" in rows[1] and "60 ms" in rows[1] and "v7" in rows[1]
    # the group's options work too
    assert runner.invoke(app, ["devices", "--state-dir", str(state_dir), "show", pi]).output == result.output
    [ran] = [line.split("│") for line in result.output.splitlines() if "11.0" in line]
    assert [cell.strip() for cell in ran[1:5]] == ["0.5", "5", "11.0", "2.20"]  # 3 + 2 requests, 6 + 5 ms


def test_devices_assign_sets_a_calibrated_density_by_hand(state_dir: Path) -> None:
    pi = str(_id(state_dir, "pi-kitchen"))
    assign = ["devices", "assign", "--state-dir", str(state_dir), pi]
    result = runner.invoke(app, [*assign, "0.25000000000001"])  # typed: the calibrated 0.25 it stands for
    assert result.exit_code == 0 and f"device {pi} now runs density 0.25" in result.output, result.output
    with Registry(state_dir=state_dir) as registry:
        assert registry.get_device(int(pi)).current_density == 0.25
        assert registry.device_history(int(pi))[-1].reason.value == "operator"
    result = runner.invoke(app, [*assign, "0.3"])
    assert result.exit_code != 0 and "not calibrated at density 0.3; calibrated: 1, 0.5, 0.25, 0.1" in result.output
    result = runner.invoke(app, ["devices", "assign", "--state-dir", str(state_dir), "424242", "0.5"])
    assert result.exit_code != 0 and "device 424242 is not registered" in result.output


def test_a_device_reports_what_it_served_checked(state_dir: Path, calibration: list[CalibrationPoint]) -> None:
    pi, phone = _id(state_dir, "pi-kitchen"), _id(state_dir, "phone-anna")
    with Registry(state_dir=state_dir) as registry:
        assert registry.served_totals(pi) == {0.5: (5, 11.0), 0.25: (1, 1.0)}
        assert registry.served_totals(phone) == {}
        for bad in ({7.0: (1, 1.0, 0.5)}, {0.5: (-1, 1.0, 0.0)}, {0.5: (1, float("nan"), 0.5)},
                    {0.5: (10**12, 1.0, 0.5)}, {0.5: (2, 1.0, 2.5)}, {0.5: (2, 1.0, float("inf"))}):
            with pytest.raises(InvalidInputError, match="served"):
                registry.heartbeat(pi, Budget(60, 500), bad)


def test_devices_show_unknown_id_fails(state_dir: Path) -> None:
    result = runner.invoke(app, ["devices", "show", "99", "--state-dir", str(state_dir)])
    assert result.exit_code == 2
    assert "error: device 99 is not registered" in result.output


def test_db_upgrade_creates_then_keeps_the_schema(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    first = runner.invoke(app, ["db", "upgrade", "--state-dir", str(state)])
    assert first.exit_code == 0, first.output
    head = head_revision()  # the newest migration's
    assert f"revision {head} (was empty)" in first.output
    assert (state / "registry.sqlite3").exists()
    again = runner.invoke(app, ["db", "upgrade", "--state-dir", str(state)])
    assert f"revision {head} (was {head})" in again.output


@pytest.mark.parametrize("command", [["devices"], ["devices", "show", "1"], ["db", "upgrade"]])
def test_unusable_database_url_is_a_clear_error(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--db", "nosuchdb://x/y"])
    assert result.exit_code == 2
    assert "error: cannot" in result.output and "nosuchdb" in result.output


@pytest.mark.parametrize("name", ["evil[/oops]", "a\x00b", "\x1b[31mred", "\u202egnp.exe", "x" * 129, " "])
def test_a_name_with_markup_control_or_direction_characters_is_refused(tmp_path: Path, name: str,
                                                                        calibration: list[CalibrationPoint]) -> None:
    with Registry(state_dir=tmp_path) as registry, pytest.raises(InvalidInputError, match="a device name must be"):
        registry.register_device(name, "pi4", calibration)


def test_names_from_before_the_rule_print_spelt_out_not_raw(state_dir: Path) -> None:
    """A registry written by an older version may hold such names: listing them must not break or mislead."""
    pi = str(_id(state_dir, "pi-kitchen"))
    engine = make_engine(f"sqlite:///{state_dir / 'registry.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE devices SET name = :name WHERE id = :id"),
                     {"name": "evil[/oops]\x1b[2J\u202e", "id": int(pi)})
    engine.dispose()
    result = runner.invoke(app, ["devices", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    assert "evil[/oops]" in result.output and "\\x1b[2J\\u202e" in result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    shown = runner.invoke(app, ["devices", "show", pi, "--state-dir", str(state_dir)])
    assert shown.exit_code == 0 and "\\x1b" in shown.output


def test_an_error_carrying_a_log_tail_prints_as_text_not_markup_or_terminal_control() -> None:
    """A SuperLink log a stranger's run wrote into: markup, ANSI escapes and NUL must not reach the terminal raw."""
    tail = "[/bold]oops [red]x[/red]\x1b[2J\x00\u202eevil\nnext line\ttab"
    shown = safe_text(tail)
    assert "\x1b" not in shown and "\x00" not in shown and "\u202e" not in shown
    assert "\\x1b" in shown and "\\u202e" in shown and "\nnext line\ttab" in shown
    console = Console(record=True, width=200)
    console.print(shown)  # a MarkupError here is what crashed the coordinator before
    assert "[/bold]oops [red]x[/red]" in console.export_text()


def test_enroll_issues_one_time_tokens_shown_once(tmp_path: Path, calibration: list[CalibrationPoint]) -> None:
    state = tmp_path / "new"  # enrolling may come before the coordinator's first start
    result = runner.invoke(app, ["devices", "enroll", "pi-1", "pi-2", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert "2 enrollment tokens, valid 24 h, shown once" in result.output and "dress-agent join" in result.output
    quiet = runner.invoke(app, ["devices", "enroll", "pi-3", "--token-only", "--expires-in", "1", "--state-dir",
                                str(state)])
    [token] = quiet.output.split()
    assert token.startswith("dfe_")
    with Registry(state_dir=state) as registry:
        principal = registry.authenticate(token)
        assert principal is not None and (principal.name, principal.device_id) == ("pi-3", None)
        registry.enroll_device(token, "", "pi4", calibration)
        assert registry.authenticate(token) is None  # spent
    bad = runner.invoke(app, ["devices", "enroll", "evil[/oops]", "--state-dir", str(state)])
    assert bad.exit_code == 2 and "a device name must be" in bad.output
