"""gRPC control plane (dress.fleet.v1.ControlPlane): how device agents talk to the registry.

Each RPC is one registry call, hence one database transaction: a rejected request changes nothing.
Bad input is answered with the gRPC status code that says whose fault it is, and a message saying what.
Every call must prove who makes it (contracts/credentials.py): a device acts only as itself, and a stranger
learns nothing, not even the architecture.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from contracts.checked_service import add_checked_servicer
from contracts.credentials import check_public_key, digest, presented_secret
from contracts.policy import Budget, validate_calibration
from contracts.settings import RunSettings, heartbeat_period_s
from contracts.wire import CONTROL_PLANE_KEEPALIVE, architecture_to_proto, calibration_from_proto
from coordinator.metrics import FleetMetrics
from coordinator.registry import DeviceNotFoundError, EnrollmentError, InvalidInputError, Principal, Registry
from coordinator.supernodes import KeyChange, KeyRetiredError, SupernodeKeys
from dress_model.models import Architecture
from dress_model.sparsity import density_at, level_of
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ControlPlane"].full_name
# Python threads share one GIL: past ~16 requests in flight, switching costs more than it overlaps.
DEFAULT_MAX_WORKERS = 16
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024  # control messages are tiny; anything bigger is a bug or abuse
DEFAULT_CHUNK_BYTES = 1024 * 1024  # well under gRPC clients' default 4 MiB receive limit
# A device's credential is looked up once per this many seconds, not on every heartbeat; a re-enrolled
# device's old credential is therefore refused at most this long after the new one is issued.
CREDENTIAL_CACHE_S = 30.0
FLEET_RECOUNT_S = 10.0  # the fleet is counted for its heartbeat period at most this often, not per heartbeat

# Packed model bytes of a version ("": the initial model) at a density; LookupError when there is none.
ModelProvider = Callable[[str, float, bool], bytes]  # (version, density, float16) -> packed file


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Map registry and validation errors to gRPC status codes; anything else is a bug (UNKNOWN, logged)."""
    try:
        yield
    except DeviceNotFoundError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except EnrollmentError as e:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
    except ValueError as e:  # InvalidInputError, and Budget/CalibrationPoint refusing to be built
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class Authenticator:
    """Who a call's bearer secret proves the caller is; device credentials are remembered for a while (the
    heartbeat path runs a thousand times a second), enrollment tokens never (each is good for one Register)."""

    def __init__(self, registry: Registry, cache_s: float = CREDENTIAL_CACHE_S, max_cached: int = 1 << 17) -> None:
        self._registry = registry
        self._cache_s = cache_s
        self._max_cached = max_cached
        self._known: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, context: grpc.ServicerContext) -> tuple[Principal, str]:
        """The caller and the secret it presented; aborts UNAUTHENTICATED when there is none or it proves nobody."""
        secret = presented_secret(context.invocation_metadata())
        if secret is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no credential: every call needs 'authorization: "
                          "Bearer <device credential or enrollment token>' (dress-fleet devices enroll NAME)")
        key, now = digest(secret), time.monotonic()
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[1] > now:
            return known[0], secret
        principal = self._registry.authenticate(secret)
        if principal is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the credential or enrollment token is unknown, spent or "
                          "expired: enroll the device again (dress-fleet devices enroll NAME)")
        if principal.device_id is not None:
            with self._lock:
                if len(self._known) >= self._max_cached:
                    self._known.clear()
                self._known[key] = (principal, now + self._cache_s)
        return principal, secret


def _own_device(principal: Principal, context: grpc.ServicerContext) -> int:
    """The registry id of the device the caller's credential proves; PERMISSION_DENIED for a token holder."""
    if principal.device_id is None:
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      "an enrollment token only describes and registers: register first to get a credential")
    return principal.device_id


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    """Translates protobuf messages to registry calls and back, as the caller its credential proves; a density
    crosses the wire as its level, mapped here and nowhere else on this side."""

    def __init__(self, registry: Registry, architecture: Architecture, model_provider: ModelProvider,
                 chunk_bytes: int, max_fetches: int, heartbeat_s: float, supernodes: SupernodeKeys | None = None,
                 metrics: FleetMetrics | None = None):
        self._registry = registry
        self._supernodes = supernodes  # a TLS fleet: SuperNode keys registered with the SuperLink
        self._caller = Authenticator(registry)
        self._metrics = metrics  # what the operator's listener serves: heartbeats are counted here
        self._heartbeat_s = heartbeat_s  # the setting; devices are told heartbeat_period_s of it and the fleet
        self._period_lock = threading.Lock()
        self._period_s, self._recount_at = heartbeat_s, 0.0
        self._densities = architecture.densities
        self._architecture = architecture_to_proto(architecture)
        self._model_provider = model_provider
        self._chunk_bytes = chunk_bytes
        # A download holds a server thread for its whole stream; capping them keeps threads for heartbeats
        # when a new model version sends the whole fleet fetching at once.
        self._fetch_slots = threading.BoundedSemaphore(max_fetches)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        caller, _ = self._caller(context)
        with _status_on_error(context):
            version = self._registry.version_for(caller.name) or ""
        return pb.DescribeResponse(architecture=self._architecture, model_version=version)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        caller, secret = self._caller(context)
        if request.name and request.name != caller.name:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the credential or token is for device {caller.name!r}, not {request.name!r}")
        credential = ""
        with _status_on_error(context):  # checked before a SuperNode key costs the SuperLink a registration
            calibration = validate_calibration(calibration_from_proto(request.calibration, self._densities))
            measured = sorted(p.level for p in request.calibration)  # each one checked, none twice
            if measured != list(range(len(self._densities))):
                raise InvalidInputError(
                    f"calibration must measure every level 0-{len(self._densities) - 1} of the fleet's densities "
                    + ", ".join(f"{d:g}" for d in self._densities) + "; got levels "
                    + (", ".join(map(str, measured)) or "none") + " (ask Describe for the architecture to calibrate)")
        change = self._supernode_key(caller, request.supernode_public_key, context)
        supernode = None if change is None else (change.key_sha256, change.node_id)
        with self._undo_on_error(change), _status_on_error(context):
            if caller.device_id is None:  # the first registration spends the enrollment token
                assignment, credential = self._registry.enroll_device(secret, caller.name, request.profile,
                                                                      calibration, supernode)
            else:
                assignment = self._registry.register_device(caller.name, request.profile, calibration, supernode)
        return pb.RegisterResponse(device_id=assignment.device_id, level=self._level(assignment.density),
                                   model_version=assignment.model_version or "", architecture=self._architecture,
                                   heartbeat_s=self._period(), credential=credential, name=caller.name)

    def _supernode_key(self, caller: Principal, public_key: str, context: grpc.ServicerContext) -> KeyChange | None:
        """A TLS fleet: the caller's SuperNode key registered with the SuperLink (None: it already was)."""
        if self._supernodes is None:
            return None
        try:
            return self._supernodes.prepare(caller.name, check_public_key(public_key))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this fleet authenticates SuperNodes: {e}")
        except KeyRetiredError as e:  # the agent makes a new key pair and registers again
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{e}; register a new SuperNode key")
        except RuntimeError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the SuperLink refused the SuperNode key: {e}")
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _undo_on_error(self, change: KeyChange | None) -> Iterator[None]:
        """A key registered for a registration that then failed is unregistered; a replaced one once it succeeded."""
        try:
            yield
        except BaseException:
            if change is not None:
                self._supernodes.abort(change)  # type: ignore[union-attr]
            raise
        if change is not None:
            self._supernodes.commit(change)  # type: ignore[union-attr]

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        device_id = _own_device(self._caller(context)[0], context)
        with _status_on_error(context):
            if not request.HasField("budget"):
                raise InvalidInputError("heartbeat has no budget")
            b = request.budget
            budget = Budget(b.latency_ms, b.memory_mb, b.battery if b.HasField("battery") else None)
            served = {self._density(u.level): (u.requests, u.busy_ms, u.confidence_sum) for u in request.served}
            if len(served) != len(request.served):
                raise InvalidInputError("heartbeat lists a level it served more than once")
            checks = {(c.model_version, self._density(c.level)): (c.examples, c.correct) for c in request.checks}
            if len(checks) != len(request.checks):
                raise InvalidInputError("heartbeat lists a check of one version at one level more than once")
            assignment = self._registry.heartbeat(device_id, budget, served, request.model_version or None, checks)
        if self._metrics is not None:
            self._metrics.heartbeats.inc()
        return pb.HeartbeatResponse(level=self._level(assignment.density), model_version=assignment.model_version or "",
                                    changed=assignment.changed, heartbeat_s=self._period())

    def _period(self) -> float:
        """The period devices are told: the setting, longer for a large fleet (contracts.settings), which is
        counted at most every FLEET_RECOUNT_S."""
        with self._period_lock:
            if (now := time.monotonic()) >= self._recount_at:
                self._period_s = heartbeat_period_s(self._heartbeat_s, self._registry.count_devices())
                self._recount_at = now + FLEET_RECOUNT_S
            return self._period_s

    def _density(self, level: int) -> float:
        """The density a level a device sent stands for; ValueError (INVALID_ARGUMENT) for one out of range."""
        return density_at(self._densities, level)

    def _level(self, density: float) -> int:
        return level_of(self._densities, density)

    def FetchModel(self, request: pb.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        caller = self._caller(context)[0]
        device_id = _own_device(caller, context)
        with _status_on_error(context):
            density = self._density(request.level)
            calibrated = self._registry.calibrated_densities(device_id)
            if density not in calibrated:
                raise InvalidInputError(
                    f"device {device_id} is not calibrated at level {request.level} (density {density:g}); "
                    "calibrated: " + ", ".join(f"{d:g}" for d in calibrated))
            version = self._registry.version_for(caller.name) or ""  # its canary's candidate, or the stable one
        if not self._fetch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many model downloads in progress; retry later")
        try:
            try:
                payload = self._model_provider(version, density, request.float16)
            except LookupError as e:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no packed model at density {density:g}: {e}")
            digest = hashlib.sha256(payload).hexdigest()
            view = memoryview(payload)
            for offset in range(0, max(len(payload), 1), self._chunk_bytes):
                yield pb.ModelChunk(data=bytes(view[offset:offset + self._chunk_bytes]), offset=offset,
                                    total_size=len(payload), sha256=digest, model_version=version,
                                    level=request.level)
        finally:
            self._fetch_slots.release()


def serve(
    registry: Registry,
    host: str,
    port: int,
    architecture: Architecture,
    model_provider: ModelProvider,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_fetches: int | None = None,
    metrics: FleetMetrics | None = None,
    heartbeat_s: float | None = None,
    credentials: grpc.ServerCredentials | None = None,
    supernodes: SupernodeKeys | None = None,
) -> grpc.Server:
    """Start the control plane (and the standard health service) on host:port; returns without blocking.

    Agents are idle between heartbeats, so `max_workers` bounds requests in flight, not agents.
    FetchModel streams hold a worker each for their duration: at most `max_fetches` (default half
    the workers) run at once, further ones get RESOURCE_EXHAUSTED and retry. ``heartbeat_s`` is how often
    devices are told to heartbeat (default: the run settings' default). With ``credentials`` it serves TLS only;
    with ``supernodes`` every registration also registers the device's SuperNode key with the SuperLink.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="control-plane"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", chunk_bytes + 64 * 1024),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share its traffic
            *CONTROL_PLANE_KEEPALIVE,
        ],
    )
    servicer = ControlPlaneServicer(registry, architecture, model_provider, chunk_bytes,
                                    max_fetches or max(1, max_workers // 2),
                                    heartbeat_s or RunSettings.defaults().heartbeat_s, supernodes, metrics)
    add_checked_servicer(servicer, server, pb.DESCRIPTOR.services_by_name["ControlPlane"])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"control plane could not bind {address}")
    server.start()
    log.info("control plane serving %s on %s (registry %s)", SERVICE_NAME, address, registry.safe_url)
    return server
