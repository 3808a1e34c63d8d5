"""`dress-fleet`: the operator's command line — the method on one machine, the fleet, the registry.

Each command parses its options, calls one function, and prints. Run settings take their defaults from the
Flower app's config (contracts.settings), so `--help` shows what a run does when nothing is said.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import accuracy_line, console, fail, progress_bar, version_option
from cli.method import add_commands
from cli.registry import db_app, devices_app, models_app, operators_app
from cli.run_options import with_run_options
from contracts.settings import RunSettings
from dress_model.data import DataError
from runtime.processes import stop_on_sigterm
from simulations.report import plain_text, profile_table, signed_text
from simulations.run import OPERATOR_SECRET, SimulationSettings, run_simulation
from simulations.traces import TRACES_HELP

app = typer.Typer(
    help="dress-fleet: train and serve DRESS nested row-sparse subnets across fleets of edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(version: bool = version_option("dress-fleet")) -> None:
    """dress-fleet: train and serve DRESS nested row-sparse subnets across fleets of edge devices."""


add_commands(app)
app.add_typer(devices_app, name="devices")
app.add_typer(models_app, name="models")
app.add_typer(operators_app, name="operators")
app.add_typer(db_app, name="db")
coordinator_app = typer.Typer(help="Run the fleet coordinator: registry, control plane, Flower SuperLink, DRESS run.",
                              no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")


@coordinator_app.command("start")
@with_run_options
def coordinator_start_cmd(
    run: RunSettings,
    host: Annotated[str, typer.Option(help="Address devices reach the SuperLink and control plane at.")] = "127.0.0.1",
    superlink_port: Annotated[int, typer.Option(help="Flower SuperLink's Fleet API for devices. With --certs it is nginx passing only the Fleet API to the SuperLink on loopback, where runs are started, stopped and listed.")] = 9092,
    control_port: Annotated[int, typer.Option(help="DRESS control plane (gRPC: describe, register, heartbeat, fetch model).")] = 9093,
    operator_port: Annotated[int, typer.Option(help="The operator's HTTPS listener: Prometheus metrics at /metrics, the fleet at /api/devices; every request needs an operator's credential (`dress-fleet operators add NAME`). 0: none.")] = 9095,
    db: Annotated[Optional[str], typer.Option(help="Registry SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default SQLite in --state-dir.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Registry, checkpoints, Flower state and logs.")] = Path(RunSettings.state_dir),
    min_devices: Annotated[int, typer.Option(min=1, help="Devices that must join before round 1.")] = 2,
    certs: Annotated[Optional[Path], typer.Option(help="Folder with the fleet's ca.pem, server.pem and server.key: TLS on the SuperLink and control plane (required beyond loopback; `dress-fleet certs init` makes a test fleet's).")] = None,
) -> None:
    """Start the SuperLink and control plane, wait for devices, and run federated DRESS; Ctrl-C stops everything."""
    from coordinator.launcher import Coordinator, Endpoints
    from runtime.certificates import FleetCertificates

    # --min-devices is at least 1 and paths are not range-checked: nothing replaced here can be refused
    settings = run.replace(wait_for_nodes=min_devices, db_url=db or "", state_dir=str(state_dir))
    rounds = settings.num_rounds
    try:
        coordinator = Coordinator(settings, Endpoints(host, superlink_port, control_port, operator_port or None),
                                  certs=FleetCertificates(certs) if certs else None)
    except ValueError as e:
        raise fail(str(e)) from None
    stop_on_sigterm()  # a service manager's stop gets the same orderly shutdown as Ctrl-C
    try:
        coordinator.start()
        console.print(f"[bold]SuperLink[/]      {coordinator.endpoints.superlink}  (agents: --superlink)")
        console.print(f"[bold]Control plane[/]  {coordinator.endpoints.control_plane}  (agents: --coordinator)")
        if coordinator.operator is not None:
            console.print(f"[bold]Operators[/]      {coordinator.operator.scheme}://{coordinator.operator.address}/metrics  "
                          "(an operator's credential: dress-fleet operators add NAME)")
        console.print(f"[bold]Registry[/]       {coordinator.registry.safe_url if coordinator.registry else ''}")
        console.print(f"[bold]State[/]          {state_dir}  (logs in {state_dir / 'logs'})")
        run_id = coordinator.submit()
        console.print(f"Run {run_id} submitted: waiting for {min_devices} device(s), then {rounds} rounds. Ctrl-C stops.")

        def on_round(entry: dict) -> None:
            console.print(f"round {entry['round']}: {len(entry['participants'])} devices trained; "
                          f"accuracy {accuracy_line(entry['accuracy'])}")

        coordinator.follow(run_id, on_round)
        console.print("Run finished; the control plane keeps serving the fleet. Ctrl-C stops.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("Stopping…")
    except (RuntimeError, TimeoutError, DataError, OSError, ValueError) as e:
        raise fail(str(e)) from None
    finally:
        coordinator.stop()


certs_app = typer.Typer(help="TLS certificates for a fleet.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init_cmd(
    dir: Annotated[Path, typer.Option("--dir", help="Folder to create them in (one fleet: one folder).")] = Path("certs"),
    host: Annotated[Optional[list[str]], typer.Option("--host", help="Name or IP devices reach the coordinator by; repeat for several (loopback is always included).")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity.")] = 365,
) -> None:
    """Make a test fleet's CA (ca.pem, ca.key) and the coordinator's certificate (server.pem, server.key).

    Give the coordinator `--certs DIR`; copy ca.pem to every device (`dress-agent join --ca ca.pem`). Keep ca.key
    off the network: whoever holds it can impersonate the coordinator."""
    from runtime.certificates import init_certificates

    try:
        made = init_certificates(dir, list(host or []), days)
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    console.print(f"CA {made.ca} and server certificate {made.server_cert} for "
                  f"{', '.join(escape(h) for h in (host or []) + ['localhost', '127.0.0.1', '::1'])}")


@certs_app.command("issue")
def certs_issue_cmd(
    name: Annotated[str, typer.Argument(help="What it is for: names the files NAME.pem and NAME.key.")],
    dir: Annotated[Path, typer.Option("--dir", help="The fleet's folder from `certs init` (holds ca.key).")] = Path("certs"),
    host: Annotated[Optional[list[str]], typer.Option("--host", help="A server certificate: name or IP callers reach the agent by; repeat for several (loopback is always included).")] = None,
    client: Annotated[bool, typer.Option("--client", help="A client certificate: a caller's credential for agents' Predict and Status.")] = False,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity.")] = 365,
) -> None:
    """Issue a certificate the fleet CA signs: an agent's Predict listener (`dress-agent join --predict-cert
    NAME.pem --predict-key NAME.key`), or with --client a caller's (`dress-agent predict --cert NAME.pem --key
    NAME.key --ca ca.pem`)."""
    from contracts.naming import check_name
    from runtime.certificates import issue_certificate

    try:
        check_name(name)
        cert, key = issue_certificate(dir, name, list(host or []), client, days)
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    what = "client certificate" if client else ("server certificate for "
                                               + ", ".join(escape(h) for h in (host or []) + ["loopback"]))
    console.print(f"{what}: {cert} and {key} (keep the key on the machine that uses it)")


@app.command("simulate")
@with_run_options
def simulate_cmd(
    run: RunSettings,
    devices: Annotated[int, typer.Option(min=1, help="Virtual devices (Flower virtual SuperNodes).")] = 100,
    traces: Annotated[str, typer.Option(help=f"Budget traces, indexed by round: {TRACES_HELP} with columns trace, round, available, memory_share, battery, online.")] = SimulationSettings.traces,
    deadline: Annotated[float, typer.Option(help="The fleet's latency deadline, in units of the full model's latency on the reference laptop-x86 (this machine).")] = SimulationSettings.deadline,
    dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of devices that drop out for a few rounds (generated traces).")] = SimulationSettings.dropout,
    db: Annotated[Optional[str], typer.Option(help="Registry SQLAlchemy URL; default SQLite in the run directory.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory for report.md, metrics.json and plots.")] = Path("runs/simulation"),
    superlink_port: Annotated[int, typer.Option(help="Port of the simulation's SuperLink; 0 = a free one.")] = 0,
    control_port: Annotated[int, typer.Option(help="Port of the simulation's control plane; 0 = a free one.")] = 0,
    ray_address: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="An existing Ray cluster's address, e.g. HEAD:6379 (run this on a node of the cluster) or ray://HEAD:10001 (Ray Client); default: a Ray started on this machine for the run. The README says how to set up a cluster.")] = SimulationSettings.ray_address,
    calibration: Annotated[Optional[Path], typer.Option(help="A calibration.json an earlier run wrote in its run directory: build the same fleet from it.")] = None,
    dashboard: Annotated[bool, typer.Option("--dashboard", help="Serve the operator dashboard for the simulated fleet on 127.0.0.1 (--dashboard-port): sign in with the credential the run writes to OUT/operator.secret.")] = False,
    dashboard_port: Annotated[int, typer.Option(min=0, max=65535, help="The dashboard's port with --dashboard (0: a free one, logged).")] = 9095,
    measure: Annotated[bool, typer.Option("--measure", help="Time the model on this machine now, though a reference calibration ships for the run (simulations/reference_calibration.json: the app's defaults, measured on an idle machine). Timings move with the machine's load, and with them the densities devices afford.")] = False,
) -> None:
    """Simulate a fleet of heterogeneous devices on Flower's simulation engine (Ray), deployment code throughout."""
    run = run.replace(db_url=db or "")
    rounds, fraction, mix = run.num_rounds, run.fraction, run.mix
    try:
        settings = SimulationSettings(run, devices=devices, traces=traces, deadline=deadline, dropout=dropout,
                                      run_dir=out, superlink_port=superlink_port, control_port=control_port,
                                      ray_address=ray_address, calibration=calibration, measure=measure,
                                      dashboard_port=dashboard_port if dashboard else None)
    except ValueError as e:
        raise fail(str(e)) from None
    console.print(f"Simulating {devices} devices ({mix}; {traces} traces, deadline {deadline:g}), {rounds} rounds, "
                  f"{fraction:g} of the fleet per round" + (f", on the Ray cluster at {escape(settings.ray_address)}"
                                                       if settings.ray_address else ""))
    if dashboard:
        console.print(f"Dashboard: http://127.0.0.1:{dashboard_port or '(a free port, logged)'}/ once the fleet is "
                      f"up; sign in with the credential in {out / OPERATOR_SECRET}")
    with progress_bar() as progress:
        task = progress.add_task("rounds", total=rounds, info="starting the fleet, SuperLink and Ray")

        def on_round(entry: dict) -> None:
            info = f"{len(entry['participants'])} devices, acc {accuracy_line(entry['accuracy'])}"
            progress.update(task, completed=entry["round"], info=info)
            if not console.is_terminal:  # a log or a pipe sees no bar: a line per round instead
                console.print(f"round {entry['round']}/{rounds}: {info}")

        stop_on_sigterm()
        try:
            metrics = run_simulation(settings, on_round)
        except (RuntimeError, TimeoutError, DataError, ValueError) as e:
            raise fail(str(e)) from None
    table = Table(title=f"Final accuracy after {metrics['rounds']} rounds ({metrics['wall_s']:.0f} s, "
                        f"peak {metrics['peak_rss_mb']:.0f} MB)")
    for column in ("density", "devices", "accuracy %", "over the next sparser", "centralized %", "gap", "bytes down",
                   "bytes up"):
        table.add_column(column, justify="right")
    traffic = {row["density"]: row for row in metrics["bytes"]}
    for row in metrics["accuracy"]:
        t = traffic.get(row["density"], {"down": 0, "up": 0})
        table.add_row(f"{row['density']:g}", str(row["devices"]), f"{row['accuracy']:.2f}",
                      signed_text(row["over_sparser"]), plain_text(row["centralized"]), signed_text(row["gap"]),
                      f"{t['down']:,.0f}", f"{t['up']:,.0f}")
    console.print(table)
    header, rows = profile_table(metrics["profiles"])
    per_profile = Table(title="Densities trained per profile (device-rounds)")
    for column in header:
        per_profile.add_column(column, justify="right")
    for row in rows:
        per_profile.add_row(*row)
    console.print(per_profile)
    console.print(f"Report: {out / 'report.md'}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()
