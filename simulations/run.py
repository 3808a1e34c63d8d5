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

from agent.calibration import calibrate
from coordinator.launcher import Coordinator, Endpoints
from coordinator.profiles import load_profiles
from coordinator.server_app import initial_model, read_rounds
from dress_model.models import create_model
from dress_model.packed import pack_checkpoint
from dress_model.partition import parse_partition
from dress_model.sparsity import parse_densities
from simulations.fleet import FleetDriver, build_fleet
from simulations.report import RunSummary, fleet_over_time, write_report
from simulations.traces import assign_profiles, parse_mix

log = logging.getLogger(__name__)


@dataclass
class SimulationSettings:
    devices: int = 100
    rounds: int = 5
    fraction: float = 0.1
    mix: str = "pi4=40,jetson-nano=30,phone=30"
    partition: str = "iid"
    dataset: str = "fashion-mnist"
    model: str = "cnn"
    width: int = 16
    densities: str = "1,0.5,0.25,0.1"
    epochs: float = 1.0
    lr: float = 0.05
    batch_size: int = 32
    max_examples: int = 0
    eval_examples: int = 2000
    seed: int = 0
    dropout: float = 0.1
    heartbeat_s: float = 1.0
    cpus_per_client: int = 1
    expected_duration_s: float = 300.0  # length of the budget traces
    db_url: str = ""
    superlink_port: int = 9392
    control_port: int = 9393
    run_dir: Path = field(default_factory=lambda: Path("runs/simulation"))

    def validate(self) -> None:
        """Everything checkable before a process starts: a bad flag must not cost a half-started fleet."""
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        parse_mix(self.mix, list(load_profiles()))
        parse_partition(self.partition)
        parse_densities(self.densities)
        create_model(self.model, self.densities)

    def run_config(self) -> dict[str, Any]:
        return {
            "num-rounds": self.rounds,
            "fraction": self.fraction,
            "wait-for-nodes": self.devices,
            "densities": self.densities,
            "model": self.model,
            "width": self.width,
            "dataset": self.dataset,
            "partition": self.partition,
            "seed": self.seed,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch-size": self.batch_size,
            "max-examples": self.max_examples,
            "eval-examples": self.eval_examples,
            "db-url": self.db_url,
        }


def run_simulation(settings: SimulationSettings, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    settings.validate()
    state = settings.run_dir / "state"
    shutil.rmtree(state, ignore_errors=True)
    started = time.monotonic()
    coordinator = Coordinator(
        state,
        settings.run_config(),
        Endpoints("127.0.0.1", settings.superlink_port, settings.control_port),
        simulation=True,
    )
    model = initial_model(coordinator.run_config)
    measured = calibrate(pack_checkpoint(model), (model.arch.in_channels, model.arch.image_size, model.arch.image_size))
    profiles = load_profiles()
    names = assign_profiles(parse_mix(settings.mix, list(profiles)), settings.devices, settings.seed)
    fleet = build_fleet([profiles[n] for n in names], measured, settings.expected_duration_s, settings.seed, settings.dropout)
    driver = FleetDriver(fleet, coordinator.endpoints.control_plane, settings.heartbeat_s)
    try:
        coordinator.start()
        driver.register()
        driver.start()
        run_id = coordinator.submit(
            # Ray wants a whole CPU count here; a float such as 1.0 fails the run.
            {"num-supernodes": settings.devices, "client-resources-num-cpus": int(settings.cpus_per_client)}
        )
        coordinator.follow(run_id, on_round)
        assert coordinator.registry is not None
        fleet_history = fleet_over_time(coordinator.registry)
    finally:
        driver.stop()
        coordinator.stop()
    summary = RunSummary(
        settings={k: str(v) for k, v in asdict(settings).items()},
        rounds=read_rounds(state),
        fleet=fleet_history,
        devices=settings.devices,
        wall_s=time.monotonic() - started,
        peak_rss_mb=coordinator.memory.peak_mb,
    )
    return write_report(settings.run_dir, summary)
