"""`dress-fleet simulate`: N virtual devices on Flower's simulation engine, the deployment's code throughout.

The coordinator starts as in deployment (registry, control plane, SuperLink — here in simulation mode, so
Ray runs the ClientApps as virtual SuperNodes); the virtual fleet registers and heartbeats over gRPC; the
DRESS run is submitted with `flwr run`. Shut down in reverse order.

Ray is the one started for the run on this machine, or with ``ray_address`` an existing Ray cluster's: Flower's
Ray backend calls ``ray.init()``, which joins the cluster ``RAY_ADDRESS`` names, and the SuperLink's environment
(inherited by Flower's SuperExec and the ``flwr-simulation`` process it starts) is where that is set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from contracts.policy import CalibrationPoint
from contracts.profiles import load_profiles
from contracts.settings import APP_DIR, RunSettings
from coordinator.launcher import Coordinator, Endpoints
from coordinator.registry.models import DeviceStatus
from runtime.certificates import write_private
from runtime.processes import RAY_ADDRESS, pick_port
from simulations.centralized import centralized_reference
from simulations.costs import measure_calibration, reference_for
from simulations.fleet import FleetDriver, build_fleet, fleet_deadline_ms, read_calibration, write_calibration
from simulations.report import RunSummary, fleet_over_time, write_report
from simulations.traces import MIXED, check_traces, fleet_traces

log = logging.getLogger(__name__)


OPERATOR_SECRET = "operator.secret"  # the dashboard's credential, in the run directory


@dataclass
class SimulationSettings:
    """The fleet being simulated; what it trains is ``run`` (the same settings a real fleet runs with)."""

    run: RunSettings
    devices: int = 100
    traces: str = MIXED  # a trace family, or a CSV file of traces (simulations.traces)
    deadline: float = 1.5  # the fleet's latency deadline, in full-model latencies of the reference laptop-x86
    dropout: float = 0.1
    cpus_per_client: int = 1
    superlink_port: int = 0  # 0 = a free port, so simulations side by side on one machine never collide
    control_port: int = 0
    ray_address: str | None = None  # an existing Ray cluster (HOST:PORT or ray://HOST[:PORT]); None: Ray for the run
    dashboard_port: int | None = None  # the operator dashboard on loopback at this port (0: a free one); None: none
    run_dir: Path = field(default_factory=lambda: Path("runs/simulation"))
    calibration: Path | None = None  # a saved calibration.json: the same fleet as that run
    measure: bool = False  # time the model on this machine now, though a reference for the run ships
    saved: list[CalibrationPoint] | None = field(init=False, default=None, repr=False)  # what the fleet is built from
    calibration_source: str = field(init=False, default="")  # where ``saved`` came from, for the report

    def __post_init__(self) -> None:
        """Everything checkable before a process starts: a bad flag must not cost a half-started fleet."""
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"--dropout must be in [0, 1], got {self.dropout}")
        if not self.deadline > 0:
            raise ValueError(f"--deadline must be > 0, got {self.deadline}")
        check_traces(self.traces)
        if self.ray_address is not None:
            self.ray_address = check_ray_address(self.ray_address)
        if self.calibration is not None:  # read once, here: the file checked is the fleet built
            self.saved = read_calibration(self.calibration, self.run.model_label, self.run.density_list)
            self.calibration_source = f"saved: {self.calibration}"
        elif not self.measure and (reference := reference_for(self.run)) is not None:
            self.saved, self.calibration_source = reference, "reference: shipped, measured on an idle laptop-x86"
        else:
            self.calibration_source = "measured on this machine at the start of the run"
        # Every virtual node must have joined before round 1; the run's state lives in the run directory.
        self.run = self.run.replace(wait_for_nodes=self.devices, state_dir=str(self.run_dir / "state"))


def run_simulation(settings: SimulationSettings, on_round: Callable[[dict[str, Any]], None] | None = None,
                   app_dir: Path = APP_DIR) -> dict[str, Any]:
    """Run the fleet to the end of its rounds and write its report; ``app_dir`` as ``Coordinator.submit``'s."""
    state = Path(settings.run.state_dir)
    shutil.rmtree(state, ignore_errors=True)
    started = time.monotonic()
    # an unreachable cluster is refused here, in words, not as a run that fails inside flwr-simulation
    cluster = ray_cluster(settings.ray_address) if settings.ray_address else {"address": "local"}
    dashboard = None if settings.dashboard_port is None else settings.dashboard_port or pick_port()
    endpoints = Endpoints("127.0.0.1", settings.superlink_port or pick_port(), settings.control_port or pick_port(),
                          dashboard)
    coordinator = Coordinator(settings.run, endpoints, simulation=True, ray_address=settings.ray_address,
                              reference=centralized_reference(settings.run.task) or None)
    measured = settings.saved or measure_calibration(settings.run)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    write_calibration(settings.run_dir / "calibration.json", settings.run.model_label, measured)  # what this fleet was built from
    profiles = load_profiles()
    names = settings.run.partition_groups(settings.devices)
    chosen = [profiles[n] for n in names]
    traces = fleet_traces(settings.traces, chosen, settings.run.num_rounds, settings.run.seed, settings.dropout)
    fleet = build_fleet(chosen, measured, traces)

    def started_rounds() -> int:
        assert coordinator.registry is not None
        return coordinator.registry.last_round_started()

    driver = FleetDriver(fleet, settings.run.density_list, coordinator.endpoints.control_plane, started_rounds,
                         fleet_deadline_ms(measured, settings.deadline), settings.run.heartbeat_s)
    try:
        coordinator.start()
        assert coordinator.registry is not None
        if dashboard is not None:  # whoever started the run signs in with this (0600, in the run directory)
            write_private(settings.run_dir / OPERATOR_SECRET, coordinator.registry.add_operator("simulate").encode())
            log.info("dashboard at http://%s/ (credential in %s)", endpoints.operator, settings.run_dir / OPERATOR_SECRET)
        driver.register(coordinator.registry.enroll([device.name for device in fleet]))
        driver.start()
        run_id = coordinator.submit(
            # Ray wants a whole CPU count here; a float such as 1.0 fails the run.
            {"num-supernodes": settings.devices, "client-resources-num-cpus": int(settings.cpus_per_client)},
            app_dir,
        )
        coordinator.follow(run_id, on_round)
        assert coordinator.registry is not None
        rounds = coordinator.rounds()
        fleet_history = fleet_over_time(coordinator.registry)
    finally:
        driver.stop()
        if coordinator.registry is not None and driver.registered:  # the virtual fleet is gone with the run
            coordinator.registry.set_status(driver.registered, DeviceStatus.OFFLINE)
        coordinator.stop()
    summary = RunSummary(
        settings={**{k: str(v) for k, v in settings.run.to_run_config().items()},
                  **{k: str(v) for k, v in asdict(settings).items() if k not in ("run", "saved", "calibration_source")}},
        rounds=rounds,
        fleet=fleet_history,
        profiles={device.name: device.profile.name for device in fleet},
        devices=settings.devices,
        wall_s=time.monotonic() - started,
        peak_rss_mb=coordinator.memory.peak_mb,
        heartbeats=driver.stats.summary(),
        centralized=centralized_reference(settings.run.task),
        calibration_source=settings.calibration_source,
        ray=cluster,
    )
    return write_report(settings.run_dir, summary)


RAY_CLIENT_PORT = 10001  # Ray Client's default port on a head node (ray://HOST without a port)
RAY_ADDRESS_FORM = ("HOST:PORT, the address `ray start --head` prints (e.g. 10.0.0.5:6379), or ray://HOST[:PORT] "
                    f"(Ray Client, default port {RAY_CLIENT_PORT})")


def ray_endpoint(address: str) -> tuple[bool, str, int]:
    """(Ray Client or not, host, port) of a Ray address (HOST:PORT, [IPv6]:PORT or ray://HOST[:PORT]);
    ValueError where it is none of those."""
    value = address.strip()
    client = value.startswith("ray://")
    rest = value.removeprefix("ray://")
    try:
        parts = urlsplit("//" + rest)
        host, port = parts.hostname, parts.port  # port: ValueError if not a number or out of range
        extra = parts.path or parts.query or parts.fragment or parts.username
    except ValueError:
        host, port, extra = None, None, True
    if "://" in rest or not host or extra or port == 0 or (port is None and not client) or not value.isprintable() \
            or any(c.isspace() for c in value):
        raise ValueError(f"--ray-address must be {RAY_ADDRESS_FORM}; got {address!r}")
    return client, host, port or RAY_CLIENT_PORT


def check_ray_address(address: str) -> str:
    """``address`` as Ray takes it, stripped; ValueError where it is not a Ray address (``ray_endpoint``)."""
    ray_endpoint(address)
    return address.strip()


PROBE = """
import json, ray
ray.init(logging_level="ERROR", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"nodes": len(nodes), "cpus": ray.cluster_resources().get("CPU", 0), "version": ray.__version__}))
"""


def ray_cluster(address: str, timeout_s: float = 90.0) -> dict[str, Any]:
    """The Ray cluster at ``address``, as the run report records it: address, alive nodes, CPUs, Ray's version.

    Asked by a short Ray driver of its own (a few seconds), as Flower's will connect: RAY_ADDRESS, from this
    machine. RuntimeError, saying what Ray said, where nothing answers there or a driver cannot join (say, a
    machine outside the cluster given HOST:PORT instead of ray://, or another Ray version on the cluster)."""
    client, host, port = ray_endpoint(address)
    try:  # Ray itself retries a silent address for minutes
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise RuntimeError(f"no Ray {'client server' if client else 'cluster'} answers at {address}: {e}; start "
                           "one with `ray start --head` (README: Simulating on a Ray cluster)") from None
    env = {**os.environ, RAY_ADDRESS: address}
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"could not join the Ray cluster at {address} within {timeout_s:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        said = "\n".join((done.stderr.strip() or done.stdout.strip()).splitlines()[-6:])
        raise RuntimeError(f"could not join the Ray cluster at {address}:\n{said}")
    return {"address": address, **json.loads(lines[-1])}
