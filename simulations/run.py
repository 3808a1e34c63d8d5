"""`dress-fleet simulate`: N virtual devices on Flower's simulation engine, the deployment's code throughout.

The coordinator starts as in deployment (registry, control plane, SuperLink — here in simulation mode, so
Ray runs the ClientApps as virtual SuperNodes); the virtual fleet registers and heartbeats over gRPC; the
DRESS run is submitted with `flwr run`. Shut down in reverse order.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contracts.policy import CalibrationPoint
from contracts.profiles import load_profiles
from contracts.settings import APP_DIR, RunSettings
from coordinator.launcher import Coordinator, Endpoints
from coordinator.registry.models import DeviceStatus
from runtime.processes import pick_port
from simulations.centralized import centralized_reference
from simulations.costs import measure_calibration, reference_for
from simulations.fleet import FleetDriver, build_fleet, fleet_deadline_ms, read_calibration, write_calibration
from simulations.report import RunSummary, fleet_over_time, write_report
from simulations.traces import MIXED, check_traces, fleet_traces

log = logging.getLogger(__name__)


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
    endpoints = Endpoints("127.0.0.1", settings.superlink_port or pick_port(), settings.control_port or pick_port())
    coordinator = Coordinator(settings.run, endpoints, simulation=True)
    measured = settings.saved or measure_calibration(settings.run)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    write_calibration(settings.run_dir / "calibration.json", settings.run.model_label, measured)  # what this fleet was built from
    profiles = load_profiles()
    names = settings.run.partition_groups(settings.devices)
    chosen = [profiles[n] for n in names]
    traces = fleet_traces(settings.traces, chosen, settings.run.num_rounds, settings.run.seed, settings.dropout)
    fleet = build_fleet(chosen, measured, traces)

    def completed_rounds() -> int:
        assert coordinator.registry is not None
        return coordinator.registry.count_rounds()

    driver = FleetDriver(fleet, settings.run.density_list, coordinator.endpoints.control_plane, completed_rounds,
                         fleet_deadline_ms(measured, settings.deadline), settings.run.heartbeat_s)
    try:
        coordinator.start()
        assert coordinator.registry is not None
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
    )
    return write_report(settings.run_dir, summary)
