"""`dress-fleet devices`, `dress-fleet operators` and `dress-fleet db`: the registry for people, as rich tables.

Mounted into cli/fleet.py's app with add_typer (devices_app as "devices", operators_app as "operators", db_app as
"db").
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cli.common import safe_text
from contracts.naming import NAME_RULE
from contracts.policy import Budget
from coordinator.registry.engine import SQLITE_FILENAME, URL_FILENAME, default_url, is_sqlite
from coordinator.registry.errors import DeviceNotFoundError, InvalidInputError
from coordinator.registry.migrate import current_revision, head_revision, upgrade
from coordinator.registry.repository import Registry
from dress_model.sparsity import level_of

DEFAULT_STATE_DIR = Path("state")
DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy database URL (default: SQLite in --state-dir)")]
StateDirOption = Annotated[
    Path | None, typer.Option("--state-dir", help="where the default SQLite registry lives (default: ./state)")
]

devices_app = typer.Typer(help="List registered devices; `enroll NAME` to let a new device join; `show ID` for "
                          "one device's density history; `assign ID DENSITY` to set one by hand.")
db_app = typer.Typer(help="The registry database.", no_args_is_help=True)
models_app = typer.Typer(help="Model versions and their staged rollout (--canary): list them, promote a candidate "
                         "to the fleet or roll a version back by hand.", no_args_is_help=True)
operators_app = typer.Typer(help="Who may watch the fleet: the coordinator's operator listener (--operator-port: "
                            "/metrics for Prometheus, /api/devices) admits only an operator's credential.",
                            no_args_is_help=True)


def _console(stderr: bool = False) -> Console:
    return Console(highlight=False, stderr=stderr)


def shown(text: str) -> str:
    """Text a remote party chose, safe to print: rich markup escaped, control and direction characters spelt out."""
    return escape(text if text.isprintable() else ascii(text))


def _fail(message: str) -> typer.Exit:
    _console(stderr=True).print(f"[bold red]error:[/] {safe_text(message)}")
    return typer.Exit(2)


def _open(ctx: typer.Context, db: str | None, state_dir: Path | None, create: bool = False) -> Registry:
    """The registry named here or on the group: `devices --db URL show 3` and `devices show 3 --db URL` both work.
    Only ``create`` makes a new one (enrolling before the coordinator's first start)."""
    group_db, group_state_dir = ctx.obj if isinstance(ctx.obj, tuple) else (None, None)
    url = db or group_db
    if url is None:
        folder = state_dir or group_state_dir or DEFAULT_STATE_DIR
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not any((folder / name).exists() for name in (SQLITE_FILENAME, URL_FILENAME)):  # read, not create
            raise _fail(f"no registry in {folder} (--state-dir); a coordinator or simulation creates "
                        f"{SQLITE_FILENAME} there (or {URL_FILENAME} naming its --db), or pass --db URL")
        url = default_url(folder)
    elif is_sqlite(url) and not Path(make_url(url).database or "").exists():
        raise _fail(f"no registry at {make_url(url).database} (--db)")
    try:
        return Registry(url)
    except SQLAlchemyError as e:
        raise _fail(f"cannot open the registry: {str(e).splitlines()[0]}") from e


def _format_budget(budget: Budget | None) -> str:
    if budget is None:
        return "-"
    text = f"{round(budget.latency_ms, 1):g} ms, {budget.memory_mb:,.0f} MB"
    return text if budget.battery is None else f"{text}, battery {budget.battery:.0%}"


def _format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context, db: DbOption = None, state_dir: StateDirOption = None) -> None:
    """List devices: profile, status, current density, latest budget, last seen."""
    ctx.obj = (db, state_dir)
    if ctx.invoked_subcommand is not None:
        return
    with _open(ctx, db, state_dir) as registry:
        rows = registry.list_devices()
    table = Table(title=f"{len(rows)} devices")
    for column in ("id", "device", "profile", "status", "density", "budget", "last seen (UTC)"):
        table.add_column(column, justify="right" if column in ("id", "density") else "left")
    for d in rows:
        table.add_row(str(d.id), shown(d.name), shown(d.profile), d.status.value, f"{d.current_density:g}",
                      _format_budget(d.last_budget), _format_time(d.last_seen))
    _console().print(table)


@devices_app.command("enroll")
def enroll(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="device names, one token each (" + NAME_RULE + ")")],
    expires_in: Annotated[float, typer.Option(min=0.01, help="hours each token stays valid")] = 24.0,
    token_only: Annotated[bool, typer.Option(help="print only the tokens, one per line (for scripts)")] = False,
    db: DbOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Issue a one-time enrollment token per device name; `dress-agent join --token TOKEN` spends it.

    The token is shown only now (the registry keeps a digest). Enrolling a registered name lets a replacement
    device take it over: its first join revokes the old device's credential."""
    with _open(ctx, db, state_dir, create=True) as registry:
        try:
            tokens = registry.enroll(names, timedelta(hours=expires_in))
        except InvalidInputError as e:
            raise _fail(str(e)) from e
    if token_only:
        for token in tokens.values():
            typer.echo(token)
        return
    table = Table(title=f"{len(tokens)} enrollment tokens, valid {expires_in:g} h, shown once")
    table.add_column("device")
    table.add_column("token")
    for name, token in tokens.items():
        table.add_row(shown(name), token)
    _console().print(table)
    _console().print("On each device: dress-agent join --device PROFILE --coordinator HOST:PORT --superlink "
                     "HOST:PORT --token TOKEN (or DRESS_ENROLLMENT_TOKEN=TOKEN)")


@models_app.command("list")
def models_list(ctx: typer.Context, db: DbOption = None, state_dir: StateDirOption = None) -> None:
    """Every model version, oldest first: its rollout status, canary share, why it was decided, and what the
    devices' labelled checks of it gave (agents with --check-set: accuracy over all their check images)."""
    with _open(ctx, db, state_dir) as registry:
        versions = registry.list_versions()
        stable, candidate, _ = registry.rollout()
        checked = registry.checked_accuracy([v.version for v in versions])
    table = Table(title=f"{len(versions)} model versions (stable {stable or '-'}, candidate {candidate or '-'})")
    for column in ("version", "status", "canary", "published (UTC)", "decided (UTC)", "checked", "why"):
        table.add_column(column)
    for v in versions:
        table.add_row(shown(v.version), str(v.status), f"{v.canary:g}", f"{v.created_at:%Y-%m-%d %H:%M:%S}",
                      f"{v.decided_at:%Y-%m-%d %H:%M:%S}" if v.decided_at else "-", checked_text(checked.get(v.version)),
                      shown(v.reason or ""))
    _console().print(table)


def checked_text(checked: tuple[int, float] | None) -> str:
    """What devices' labelled checks of a version gave (``Registry.checked_accuracy``); "-" where none checked it."""
    return "-" if checked is None else f"{checked[1]:.1f} % on {checked[0]} devices"


def _decide(ctx: typer.Context, version: str, promote: bool, db: str | None, state_dir: Path | None) -> None:
    with _open(ctx, db, state_dir) as registry:
        try:
            if promote:
                registry.promote(version, "by an operator")
            else:
                registry.roll_back(version, "by an operator")
        except InvalidInputError as e:
            raise _fail(str(e)) from e
    _console().print(f"Model version {shown(version)} {'promoted: the fleet serves it' if promote else 'rolled back: nobody serves it'} "
                     "from its next heartbeats.")


@models_app.command("promote")
def models_promote(ctx: typer.Context, version: Annotated[str, typer.Argument(help="a version from `models list`")],
                   db: DbOption = None, state_dir: StateDirOption = None) -> None:
    """Promote VERSION to the whole fleet now, without waiting for the judge."""
    _decide(ctx, version, True, db, state_dir)


@models_app.command("rollback")
def models_rollback(ctx: typer.Context, version: Annotated[str, typer.Argument(help="a version from `models list`")],
                    db: DbOption = None, state_dir: StateDirOption = None) -> None:
    """Roll VERSION back: its canary (or, if it was promoted, the fleet) returns to the stable version before it."""
    _decide(ctx, version, False, db, state_dir)


@operators_app.command("add")
def operators_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the operator's name (" + NAME_RULE + ")")],
    credential_only: Annotated[bool, typer.Option(help="print only the credential (for scripts)")] = False,
    db: DbOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """A credential for operator NAME, shown only now (the registry keeps a digest); adding a NAME again issues a
    new one and the old stops working. Send it as 'Authorization: Bearer CREDENTIAL'."""
    with _open(ctx, db, state_dir, create=True) as registry:
        try:
            credential = registry.add_operator(name)
        except InvalidInputError as e:
            raise _fail(str(e)) from e
    if credential_only:
        typer.echo(credential)
        return
    _console().print(f"Operator [bold]{shown(name)}[/]'s credential, shown once:\n{credential}")
    _console().print("Prometheus: a scrape config with scheme: https, authorization: {credentials: CREDENTIAL} and "
                     "tls_config: {ca_file: ca.pem}, targets the coordinator's --operator-port.")


@operators_app.command("list")
def operators_list(ctx: typer.Context, db: DbOption = None, state_dir: StateDirOption = None) -> None:
    """Every operator and when they were added."""
    with _open(ctx, db, state_dir) as registry:
        operators = registry.list_operators()
    table = Table(title=f"{len(operators)} operators")
    table.add_column("operator")
    table.add_column("added (UTC)")
    for name, added in operators:
        table.add_row(shown(name), f"{added:%Y-%m-%d %H:%M:%S}")
    _console().print(table)


@operators_app.command("remove")
def operators_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the operator to remove")],
    db: DbOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Remove operator NAME: their credential stops working at once."""
    with _open(ctx, db, state_dir) as registry:
        if not registry.remove_operator(name):
            raise _fail(f"no operator named {name!r} (dress-fleet operators list)")
    _console().print(f"Removed operator {shown(name)}.")


@devices_app.command("show")
def show(
    ctx: typer.Context,
    device_id: Annotated[int, typer.Argument(help="device id, as listed by `devices`")],
    db: DbOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """A device (its Flower node, latest budget) and its density assignment history, oldest first."""
    with _open(ctx, db, state_dir) as registry:
        try:
            device = registry.get_device(device_id)
            history = registry.device_history(device_id)
            served = registry.served_totals(device_id)
        except DeviceNotFoundError as e:
            raise _fail(str(e)) from e
    node = "not yet seen by a run" if device.flower_node_id is None else str(device.flower_node_id)
    _console().print(f"{shown(device.name)} ({shown(device.profile)}), {device.status.value}, density "
                     f"{device.current_density:g}; Flower node {node}; budget {_format_budget(device.last_budget)}")
    table = Table(title=f"device {device_id}: {len(history)} assignments")
    for column in ("when (UTC)", "density", "reason", "budget", "model"):
        table.add_column(column, justify="right" if column == "density" else "left")
    for a in history:
        table.add_row(_format_time(a.assigned_at), f"{a.density:g}", a.reason.value, _format_budget(a.budget),
                      a.model_version or "-")
    _console().print(table)
    if served:
        ran = Table(title=f"device {device_id}: what its Predict ran, as reported with its heartbeats")
        for column in ("density", "requests", "busy ms", "ms per request"):
            ran.add_column(column, justify="right")
        for density, (requests, busy_ms) in served.items():
            ran.add_row(f"{density:g}", f"{requests:,}", f"{busy_ms:,.1f}", f"{busy_ms / max(1, requests):.2f}")
        _console().print(ran)
    else:
        _console().print("Predict has not reported answering any request yet.")


@devices_app.command("assign")
def assign(
    ctx: typer.Context,
    device_id: Annotated[int, typer.Argument(help="device id, as listed by `devices`")],
    density: Annotated[float, typer.Argument(help="one of the densities the device calibrated")],
    db: DbOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Set a device's density by hand (recorded as an operator decision); its next budget change moves it."""
    with _open(ctx, db, state_dir) as registry:
        try:
            calibrated = registry.calibrated_densities(device_id)
            with contextlib.suppress(ValueError):  # typed: the calibrated density it stands for, if any
                density = calibrated[level_of(calibrated, density)]
            result = registry.assign(device_id, density)
        except (DeviceNotFoundError, InvalidInputError) as e:
            raise _fail(str(e)) from e
    _console().print(f"device {device_id} now runs density {result.density:g}"
                     + ("" if result.changed else " (unchanged)"))


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None, state_dir: StateDirOption = None) -> None:
    """Migrate the registry database to the latest schema (opening the registry does this too)."""
    url = db or default_url(state_dir or DEFAULT_STATE_DIR)
    try:
        before = current_revision(url)
        upgrade(url)
    except SQLAlchemyError as e:
        raise _fail(f"cannot migrate the registry: {str(e).splitlines()[0]}") from e
    safe_url = make_url(url).render_as_string(hide_password=True)
    _console().print(f"{safe_url}: schema at revision {head_revision()} (was {before or 'empty'})")
