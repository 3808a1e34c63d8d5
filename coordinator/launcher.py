"""The coordinator's services as one object: registry, control plane, SuperLink, the operator's listener, and the
DRESS run.

`dress-fleet coordinator start` and `dress-fleet simulate` both use it; they differ only in whether the
SuperLink runs Flower's simulation engine (virtual SuperNodes on Ray) or waits for real SuperNodes.
Stopping goes in reverse order of starting, so nothing is left running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from contracts.settings import APP_DIR, RunSettings, build_run_model
from coordinator.control_plane import serve
from coordinator.fleet_proxy import FleetProxy, nginx_binary
from coordinator.metrics import FleetMetrics
from coordinator.model_store import ModelStore
from coordinator.operator_api import OperatorListener, operator_app
from coordinator.registry.engine import save_url
from coordinator.registry.records import RoundRecord
from coordinator.registry.repository import Registry
from coordinator.rollout import RolloutJudge
from coordinator.supernodes import SupernodeKeys
from dress_model.models import create_model
from runtime import processes as fr
from runtime.certificates import CertificateError, FleetCertificates, is_loopback

log = logging.getLogger(__name__)


@dataclass
class Endpoints:
    host: str = "127.0.0.1"
    superlink_port: int = 9092
    control_port: int = 9093
    operator_port: int | None = None  # the operator's HTTP listener (metrics, fleet state); None: none

    @property
    def operator(self) -> str | None:
        return None if self.operator_port is None else f"{self.host}:{self.operator_port}"

    @property
    def superlink(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    @property
    def control_plane(self) -> str:
        return f"{self.host}:{self.control_port}"


class ProcessTreeMemory:
    """Peak resident memory of this process and all its descendants (Ray workers included)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._root = psutil.Process()

    def sample(self) -> None:
        total = 0
        for p in [self._root, *self._root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_mb = max(self.peak_mb, total / 2**20)


def round_entry(record: RoundRecord) -> dict[str, Any]:
    """A recorded round as the live views and the report read it: accuracy per density plus its details."""
    return {"round": record.round, "accuracy": {str(d): m["accuracy"] for d, m in record.metrics.items()},
            **record.details}


STATUS_EVERY_S = 20.0  # between checks of the run's status while rounds are still to come


class Coordinator:
    def __init__(self, settings: RunSettings, endpoints: Endpoints, simulation: bool = False,
                 certs: FleetCertificates | None = None, ray_address: str | None = None,
                 reference: Mapping[float, float] | None = None) -> None:
        """``certs``: TLS on the control plane and the SuperLink. Without them both speak plaintext, which is
        refused on any address but loopback (CertificateError). ``ray_address`` (simulation): an existing Ray
        cluster the virtual devices train on, instead of a Ray started for the run. ``reference``: the centralized
        accuracy per density, for the dashboard's gap, when one is known."""
        if certs is None and not is_loopback(endpoints.host):
            raise CertificateError(f"plaintext is for loopback only; serving {endpoints.host} needs the fleet's "
                                   "certificates (--certs DIR; `dress-fleet certs init` makes a test fleet's)")
        self.certs = certs.require_server() if certs else None
        self.state_dir = Path(settings.state_dir)
        # TLS: only SuperNodes whose keys the control plane registered connect (Flower needs TLS for that)
        self.settings = settings.replace(state_dir=str(self.state_dir.resolve()), node_auth=certs is not None)
        self.endpoints = endpoints
        self.simulation = simulation
        self.ray_address = ray_address
        self.reference = reference
        self.memory = ProcessTreeMemory()
        self.registry: Registry | None = None
        self.server: grpc.Server | None = None
        self.superlink: fr.ManagedProcess | None = None
        self.proxy: fr.ManagedProcess | None = None
        self.operator: OperatorListener | None = None
        self.judge: RolloutJudge | None = None

    def start(self) -> None:
        """Registry, SuperLink (behind the fleet proxy on TLS), then the control plane: a device's registration
        may register its SuperNode key with the SuperLink, and it joins Flower only after registering."""
        build_run_model(self.settings)  # a method that cannot build a density fails here, before any process starts
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)  # the registry, checkpoints, logs and Flower's database: ours alone
        save_url(self.state_dir, self.settings.db_url or None)  # how the ServerApp finds the registry
        architecture = self.settings.architecture()
        self.registry = Registry(state_dir=self.state_dir)
        if self.certs is None:  # plaintext: loopback only (checked in __init__), so the SuperLink itself listens
            self.superlink = fr.start_superlink(self.state_dir, self.endpoints.host, self.endpoints.superlink_port,
                                                simulation=self.simulation, ray_address=self.ray_address)
        else:  # devices reach only the Fleet API, through nginx; run/stop/ls/register stay on loopback
            proxy = FleetProxy(self.endpoints.host, self.endpoints.superlink_port, fr.pick_port(), self.certs)
            nginx_binary()  # ProxyUnavailableError, saying how to install one, before anything starts
            self.superlink = fr.start_superlink(self.state_dir, "127.0.0.1", proxy.upstream_port,
                                                simulation=self.simulation, certs=self.certs,
                                                ray_address=self.ray_address)
            self.proxy = proxy.start(self.state_dir)
        metrics = FleetMetrics(self.registry)
        self.server = serve(self.registry, self.endpoints.host, self.endpoints.control_port, architecture,
                            ModelStore(self.registry, create_model(architecture)),
                            heartbeat_s=self.settings.heartbeat_s, metrics=metrics,
                            credentials=self.certs.server_credentials() if self.certs else None,
                            supernodes=SupernodeKeys(self.registry, self.state_dir) if self.settings.node_auth else None)
        self.judge = RolloutJudge(self.registry).start()  # candidates promoted or rolled back as devices report
        if self.endpoints.operator_port is not None:
            self.operator = OperatorListener(operator_app(self.registry, metrics, secure_cookie=self.certs is not None,
                                                          reference=self.reference),
                                             self.endpoints.host,
                                             self.endpoints.operator_port, self.certs).start()

    def submit(self, federation_config: Mapping[str, object] | None = None, app_dir: Path = APP_DIR) -> int:
        """`flwr run` of the app with every run setting; returns Flower's run id. ``app_dir``: this repository's
        app, or one built on it (benchmarks/byzantine.py submits one whose ClientApp lies on some devices)."""
        return fr.submit_run(self.state_dir, app_dir, self.settings.to_run_config(), federation_config)

    def rounds(self) -> list[dict[str, Any]]:
        """Every round the ServerApp recorded so far, from the registry's rounds table."""
        assert self.registry is not None
        return [round_entry(r) for r in self.registry.list_rounds()]

    def follow(self, run_id: int, on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Block until the run finishes, reporting each round as the ServerApp records it."""
        assert self.superlink is not None
        seen, last_check = 0, 0.0
        while True:
            self.memory.sample()
            rounds = self.rounds()
            for entry in rounds[seen:]:
                if on_round:
                    on_round(entry)
            seen = len(rounds)
            if not self.superlink.alive():
                raise RuntimeError(f"the SuperLink exited during the run:\n{self.superlink.tail()}")
            # `flwr ls` is a whole Python process (about a CPU-second): ask as soon as every round is in, and
            # otherwise only often enough to notice a run that failed midway.
            due = seen >= self.settings.num_rounds or time.monotonic() - last_check > STATUS_EVERY_S
            if due and time.monotonic() - last_check > 2:
                last_check = time.monotonic()
                status = fr.run_status(self.state_dir, run_id)
                if status.startswith("finished"):
                    for entry in self.rounds()[seen:]:
                        if on_round:
                            on_round(entry)
                    if status != "finished:completed":
                        raise RuntimeError(
                            f"run {run_id} ended as {status}; log: {self.superlink.log_path}\n{self.superlink.tail(40)}"
                        )
                    return
            time.sleep(1.0)

    def stop(self) -> None:
        if self.judge is not None:
            self.judge.stop()
            self.judge = None
        if self.operator is not None:
            self.operator.stop()
            self.operator = None
        if self.proxy is not None:  # devices first: nothing reaches a SuperLink that is going
            self.proxy.stop()
            self.proxy = None
        if self.superlink is not None:
            time.sleep(1)  # let flwr-serverapp / flwr-simulation and Ray wind down before their parent goes
            self.superlink.stop()
            self.superlink = None
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
        self.memory.sample()
        if self.registry is not None:
            self.registry.close()
            self.registry = None
