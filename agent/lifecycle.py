"""An agent's life on a device, as one object: connect, learn the architecture, calibrate, register, serve,
train through a Flower SuperNode, heartbeat; then stop in reverse.

Each step needs the one before it: the coordinator must answer before seconds go into calibration; the
architecture comes from the coordinator (Describe) so the agent never declares its own; calibration goes
with registration; the first density comes back from registration. Every call proves the device: its first
registration spends the operator's one-time enrollment token for a credential kept under --state-dir.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.budget import BudgetSource
from agent.calibration import DEFAULT_REPEATS, DEFAULT_TRAIN_REPEATS, calibrate, image_shape, initial_model
from agent.latency import LatencyModel
from agent.metrics import AgentMetrics
from agent.model_fetch import ModelFetchError, ModelFollower, ModelUpdater
from agent.monitor import DEFAULT_INTERVAL_S, BudgetMonitor
from agent.served_model import ServedModel
from agent.serving import AgentIdentity, AgentServer, serve
from agent.version_check import CheckSet, VersionChecker, check_split, unfit
from contracts.credentials import StoredCredential, supernode_key, with_bearer
from contracts.policy import CalibrationPoint
from contracts.profiles import Profile
from contracts.wire import AGENT_KEEPALIVE, architecture_from_proto, calibration_to_proto
from dress_model.data import DataError, ImageDataset
from dress_model.models import Architecture
from dress_model.sparsity import density_at
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc
from runtime.certificates import CertificateError, channel_credentials, is_loopback, mutual_server_credentials
from runtime.processes import ManagedProcess, PortInUseError, start_supernode

log = logging.getLogger(__name__)

CONTROL_PLANE = pb.DESCRIPTOR.services_by_name["ControlPlane"].full_name
DEFAULT_SERVE_PORT = 50061
DEFAULT_SUPERNODE_PORT = 9094  # Flower's default ClientAppIo port
SUPERVISE_EVERY_S = 1.0
RECONNECT_BACKOFF_MS = 5_000  # gRPC's longest wait between reconnects: the default heartbeat period


class AgentError(RuntimeError):
    """The agent cannot start; `code` is the exit code: 1 when a peer or the machine does not cooperate."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class AgentConfig:
    name: str | None  # None: the name the enrollment token or stored credential is for
    profile: Profile
    coordinator: str  # control plane HOST:PORT
    superlink: str  # Flower fleet API HOST:PORT
    budget: BudgetSource
    state_dir: Path  # SuperNode home, logs and the device's credential
    serve_host: str = "127.0.0.1"
    serve_port: int = DEFAULT_SERVE_PORT
    supernode_port: int = DEFAULT_SUPERNODE_PORT
    node_config: dict[str, object] = field(default_factory=dict)  # partition-id, num-partitions, data-dir
    heartbeat_interval: float | None = None  # None: as often as the coordinator asks; never less often
    calibration_repeats: int = DEFAULT_REPEATS
    training_calibration_steps: int = DEFAULT_TRAIN_REPEATS  # 0: training cost not measured
    ca: Path | None = None  # the fleet CA: TLS to the coordinator and the SuperLink; None = plaintext (loopback only)
    threads: int = 1
    connect_timeout: float = 5.0
    token: str | None = None  # one-time enrollment token; None: the credential stored under state_dir
    predict_cert: Path | None = None  # the Predict listener's certificate and key (with ``ca``): mutual TLS
    predict_key: Path | None = None
    fetch_float16: bool = False  # download models as float16 (fewer bytes; computed in float32)
    metrics_port: int | None = None  # Prometheus metrics beside Predict, on serve_host (0: any free port); None: none
    check_set: str | None = None  # DATASET[:N]: labelled images each model version is checked on (agent.version_check)


def heartbeat_interval(wanted: float | None, asked: float) -> float:
    """The device's heartbeat period: its own wish, but never longer than the coordinator asks (a device silent
    for several of the coordinator's periods counts as offline). An old coordinator that asks nothing (0)
    leaves the agent's default."""
    if asked <= 0:
        return wanted or DEFAULT_INTERVAL_S
    if wanted is not None and wanted > asked:
        log.warning("heartbeat every %g s instead of %g s: the coordinator asks for at least every %g s",
                    asked, wanted, asked)
        return asked
    return wanted or asked


def connect_coordinator(address: str, timeout: float, ca: Path | None = None) -> grpc.Channel:
    """A channel to a coordinator whose control plane answers its health check; AgentError otherwise.

    With ``ca`` the coordinator must present a certificate the fleet CA signed; without, plaintext is for a
    coordinator on loopback only."""
    # gRPC backs off reconnecting up to 2 minutes by default; a device whose network returns, or a restarted
    # coordinator, should hear from it within two heartbeats instead: gRPC retries at least every
    # RECONNECT_BACKOFF_MS (a refused connect or a SYN costs nobody much) and the heartbeat follows the moment it
    # is connected (BudgetMonitor's channel). Keepalive pings, idle or not, find a connection whose network went
    # away (nothing comes back, nothing says so) within seconds: gRPC then drops it and reconnects, rather than
    # sending every heartbeat and download into it until TCP gives up.
    options = [("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS), *AGENT_KEEPALIVE]
    if ca is not None:
        try:
            channel = grpc.secure_channel(address, channel_credentials(ca), options=options)
        except CertificateError as e:
            raise AgentError(str(e)) from None
    elif is_loopback(address.rpartition(":")[0]):
        channel = grpc.insecure_channel(address, options=options)
    else:
        raise AgentError(f"plaintext is for loopback only: reaching {address} needs the fleet's CA (--ca ca.pem)")
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=CONTROL_PLANE), timeout=timeout, wait_for_ready=True)
    except grpc.RpcError as e:
        channel.close()
        raise AgentError(f"cannot reach coordinator at {address} within {timeout:g} s "
                         f"({e.code().name}: {e.details()})") from None
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        channel.close()
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        raise AgentError(f"coordinator at {address} is not serving its control plane ({status})")
    return channel


class Agent:
    """`start()` brings the device into the fleet; `wait()` blocks while it is in; `stop()` leaves."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.calibration: list[CalibrationPoint] = []
        self.identity: AgentIdentity | None = None
        self.served: ServedModel | None = None
        self.supernode: ManagedProcess | None = None
        self.predict: AgentServer | None = None
        self.metrics: AgentMetrics | None = None
        self.metrics_port: int | None = None  # where the metrics listener bound, when there is one
        self.monitor: BudgetMonitor | None = None
        self.follower: ModelFollower | None = None
        self._running = contextlib.ExitStack()

    def start(self) -> None:
        """Everything up to a running device; on failure whatever started is stopped again."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        c = self.config
        predict_credentials = self.predict_credentials()
        if c.ca is None and not is_loopback(c.superlink.rpartition(":")[0]):
            raise AgentError(f"plaintext is for loopback only: reaching the SuperLink at {c.superlink} needs the "
                             "fleet's CA (--ca ca.pem)")
        channel = connect_coordinator(c.coordinator, c.connect_timeout, c.ca)
        self._running.callback(channel.close)
        secret = [self._secret()]  # the token until registration answers the credential
        stub = pb_grpc.ControlPlaneStub(with_bearer(channel, lambda: secret[0]))
        try:
            described = stub.Describe(pb.DescribeRequest(), timeout=c.connect_timeout)
            arch = architecture_from_proto(described.architecture)
            packed = initial_model(arch)
        except grpc.RpcError as e:
            raise AgentError(f"coordinator at {c.coordinator} did not describe its model: "
                             f"{e.code().name}: {e.details()}") from None
        except ValueError as e:
            raise AgentError(f"coordinator at {c.coordinator} runs a model this agent cannot build: {e}") from None
        labelled = self._check_split(arch)
        torch.set_num_threads(c.threads)  # before calibrating: what is measured must be what serves
        self.calibration = calibrate(packed, image_shape(packed), c.calibration_repeats,
                                     train_repeats=c.training_calibration_steps)
        key_file, registration = self._register(stub, arch.densities)
        name = registration.name or c.name or ""
        if registration.credential:  # the token is spent: from now on the device proves itself with this
            StoredCredential(name, registration.device_id, registration.credential, c.coordinator).save(c.state_dir)
            secret[0] = registration.credential
            log.info("enrolled as %s (device %d); credential stored in %s", name, registration.device_id,
                     c.state_dir)
        try:
            first = density_at(arch.densities, registration.level)
        except ValueError as e:
            raise AgentError(f"coordinator at {c.coordinator} assigned a level its model lacks: {e}") from None
        self.served = served = ServedModel(packed, first, latency=LatencyModel(
            {p.density: p.latency_ms for p in self.calibration}))  # per image: calibration times one image
        checker = VersionChecker(CheckSet.draw(*labelled, name)) if labelled else None
        if checker is not None:
            log.info("checking each model version on %d labelled images (%s) before serving it",
                     len(checker.check_set), c.check_set)
        updater = ModelUpdater(served, stub, fetch_level=len(arch.densities) - 1, half=c.fetch_float16,
                               checker=checker)
        if registration.model_version:
            try:
                updater(registration.model_version)
            except ModelFetchError as e:
                log.warning("serving the untrained initial model for now: %s", e)
        self.identity = AgentIdentity(name, registration.device_id, c.profile.name)

        node_config = {"device-name": name, "profile": c.profile.name, **c.node_config}
        try:
            self.supernode = start_supernode(c.state_dir, c.superlink, c.supernode_port, node_config,
                                             f"supernode-{name}", root_ca=c.ca, auth_key=key_file)
        except PortInUseError as e:
            raise AgentError(str(e)) from None
        self._running.callback(self.supernode.stop)
        self.metrics = AgentMetrics(served)
        try:
            self.predict = serve(served, self.identity, c.serve_host, c.serve_port, credentials=predict_credentials,
                                 metrics=self.metrics)
        except RuntimeError as e:  # the port is taken
            raise AgentError(str(e)) from None
        self._running.callback(self.predict.stop)
        if c.metrics_port is not None:  # behind Predict's mutual TLS, or plaintext where Predict is (loopback)
            tls = (c.ca, c.predict_cert, c.predict_key) if predict_credentials is not None else None
            try:
                listener, self.metrics_port = self.metrics.serve(c.serve_host, c.metrics_port, tls)  # type: ignore[arg-type]
            except OSError as e:
                raise AgentError(f"metrics on {c.serve_host}:{c.metrics_port}: {e.strerror or e}") from None
            self._running.callback(listener.shutdown)  # type: ignore[attr-defined]
        self.follower = ModelFollower(updater)  # downloads off the heartbeat's thread, retried with backoff
        self.follower.start()
        self._running.callback(self.follower.stop)
        self.monitor = BudgetMonitor(stub, arch.densities, c.budget, density=served.assigned_density,
                                     model_version=served.version, on_density=served.set_density,
                                     on_model_version=self.follower,
                                     interval=heartbeat_interval(c.heartbeat_interval, registration.heartbeat_s),
                                     pace=functools.partial(heartbeat_interval, c.heartbeat_interval),
                                     channel=channel,
                                     calibration=self.calibration,
                                     usage=served.usage, checks=checker.ledger if checker else None,
                                     metrics=self.metrics)
        self.monitor.start()
        self._running.callback(self.monitor.stop)

    def _check_split(self, arch: Architecture) -> tuple[ImageDataset, int] | None:
        """The labelled images --check-set names, and how many to draw, checked against the fleet's model before
        the device registers (a bad --check-set must not spend its enrollment token)."""
        if not self.config.check_set:
            return None
        data_dir = self.config.node_config.get("data-dir")
        try:
            split, examples = check_split(self.config.check_set, str(data_dir) if data_dir else None)
        except (DataError, ValueError) as e:
            raise AgentError(f"--check-set: {e}", code=2) from None
        if why := unfit(split, arch):
            raise AgentError(f"--check-set {self.config.check_set}: {why}", code=2)
        return split, examples

    def _register(self, stub: pb_grpc.ControlPlaneStub,
                  densities: tuple[float, ...]) -> tuple[Path, pb.RegisterResponse]:
        """Register with the coordinator: the SuperNode key file and the answer. A key the SuperLink retired
        (ALREADY_EXISTS: an operator removed it, or an earlier registration was undone) is replaced once."""
        c = self.config
        for renew in (False, True):
            try:
                key_file, public_key = supernode_key(c.state_dir, renew=renew)
            except ValueError as e:
                raise AgentError(str(e)) from None
            request = pb.RegisterRequest(
                name=c.name or "", profile=c.profile.name, supernode_public_key=public_key,
                calibration=calibration_to_proto(self.calibration, densities))
            try:
                return key_file, stub.Register(request, timeout=c.connect_timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS and not renew:
                    log.warning("the coordinator's SuperLink retired this device's SuperNode key (%s); making a "
                                "new one", e.details())
                    continue
                raise AgentError(f"coordinator at {c.coordinator} refused registration: "
                                 f"{e.code().name}: {e.details()}") from None
        raise AssertionError("unreachable")

    def predict_credentials(self) -> grpc.ServerCredentials | None:
        """Mutual TLS for Predict and Status when certificates are given; plaintext on loopback only."""
        c = self.config
        if c.predict_cert is None and c.predict_key is None:
            if is_loopback(c.serve_host):
                return None
            raise AgentError(f"Predict on {c.serve_host} needs TLS with client certificates: --predict-cert, "
                             "--predict-key (`dress-fleet certs issue NAME --host HOST`) and --ca", code=2)
        if c.predict_cert is None or c.predict_key is None or c.ca is None:
            raise AgentError("Predict over TLS needs all of --predict-cert, --predict-key and --ca", code=2)
        try:
            return mutual_server_credentials(c.ca, c.predict_cert, c.predict_key)
        except CertificateError as e:
            raise AgentError(str(e), code=2) from None

    def _secret(self) -> str:
        """What proves this device at its first call: the enrollment token when one is given (a first join,
        or a re-enrollment), else the credential an earlier join stored; AgentError when there is neither."""
        c = self.config
        if c.token:
            return c.token
        try:
            stored = StoredCredential.load(c.state_dir)
        except ValueError as e:
            raise AgentError(str(e)) from None
        if stored is None:
            raise AgentError(f"this device is not enrolled (no credential in {c.state_dir}): on the coordinator run "
                             "`dress-fleet devices enroll NAME` and pass its token here with --token")
        if stored.coordinator != c.coordinator:
            raise AgentError(f"the credential in {c.state_dir} is for the coordinator at {stored.coordinator}, not "
                             f"{c.coordinator}: enroll with this one (--token) or use another --state-dir")
        if c.name and stored.name != c.name:
            raise AgentError(f"the credential in {c.state_dir} is device {stored.name!r}'s, not {c.name!r}: drop "
                             "--name, or enroll this name (--token) under another --state-dir")
        return stored.credential

    def wait(self, stop: threading.Event) -> bool:
        """Block until `stop` is set (True) or the SuperNode dies (False): without it the device cannot train."""
        assert self.supernode is not None
        while not stop.wait(SUPERVISE_EVERY_S):
            if not self.supernode.alive():
                return False
        return True

    def stop(self) -> None:
        """Budget monitor, model downloads, Predict server, SuperNode, coordinator channel: the reverse of starting;
        idempotent."""
        self._running.close()
