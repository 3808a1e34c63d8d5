"""gRPC control plane (dress.fleet.v1.ControlPlane): how device agents talk to the registry.

Each RPC is one registry call, hence one database transaction: a rejected request changes nothing.
Bad input is answered with the gRPC status code that says whose fault it is, and a message saying what.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from contracts.checked_service import add_checked_servicer
from contracts.policy import Budget, CalibrationPoint, validate_calibration
from contracts.settings import RunSettings
from coordinator.registry import DeviceNotFoundError, InvalidInputError, Registry
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ControlPlane"].full_name
# Python threads share one GIL: past ~16 requests in flight, switching costs more than it overlaps.
DEFAULT_MAX_WORKERS = 16
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024  # control messages are tiny; anything bigger is a bug or abuse
DEFAULT_CHUNK_BYTES = 1024 * 1024  # well under gRPC clients' default 4 MiB receive limit

# Packed model bytes for a density; raises LookupError when there is no model at that density.
ModelProvider = Callable[[float], bytes]


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Map registry and validation errors to gRPC status codes; anything else is a bug (UNKNOWN, logged)."""
    try:
        yield
    except DeviceNotFoundError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except ValueError as e:  # InvalidInputError, and Budget/CalibrationPoint refusing to be built
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    """Translates protobuf messages to registry calls and back; its only state is the download cap."""

    def __init__(self, registry: Registry, architecture: pb.Architecture, model_provider: ModelProvider,
                 chunk_bytes: int, max_fetches: int, heartbeat_s: float):
        self._registry = registry
        self._heartbeat_s = heartbeat_s
        self._architecture = architecture
        self._model_provider = model_provider
        self._chunk_bytes = chunk_bytes
        # A download holds a server thread for its whole stream; capping them keeps threads for heartbeats
        # when a new model version sends the whole fleet fetching at once.
        self._fetch_slots = threading.BoundedSemaphore(max_fetches)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        with _status_on_error(context):
            version = self._registry.current_model_version() or ""
        return pb.DescribeResponse(architecture=self._architecture, model_version=version)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        with _status_on_error(context):
            calibration = validate_calibration(
                CalibrationPoint(p.density, p.latency_ms, p.memory_mb) for p in request.calibration)
            measured, served = sorted(p.density for p in calibration), sorted(self._architecture.densities)
            if measured != served:
                raise InvalidInputError(
                    "calibration must measure exactly the fleet's densities " + ", ".join(f"{d:g}" for d in served)
                    + "; got " + (", ".join(f"{d:g}" for d in measured) or "none")
                    + " (ask Describe for the architecture to calibrate)")
            assignment = self._registry.register_device(request.name, request.profile, calibration)
        return pb.RegisterResponse(device_id=assignment.device_id, density=assignment.density,
                                   model_version=assignment.model_version or "", architecture=self._architecture,
                                   heartbeat_s=self._heartbeat_s)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        with _status_on_error(context):
            if not request.HasField("budget"):
                raise InvalidInputError("heartbeat has no budget")
            b = request.budget
            budget = Budget(b.latency_ms, b.memory_mb, b.battery if b.HasField("battery") else None)
            served = {u.density: (u.requests, u.busy_ms) for u in request.served}
            if len(served) != len(request.served):
                raise InvalidInputError("heartbeat lists a density it served more than once")
            assignment = self._registry.heartbeat(request.device_id, budget, served)
        return pb.HeartbeatResponse(density=assignment.density, model_version=assignment.model_version or "",
                                    changed=assignment.changed, heartbeat_s=self._heartbeat_s)

    def FetchModel(self, request: pb.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        with _status_on_error(context):
            calibrated = self._registry.calibrated_densities(request.device_id)
            if request.density not in calibrated:
                raise InvalidInputError(
                    f"device {request.device_id} is not calibrated at density {request.density:g}; calibrated: "
                    + ", ".join(f"{d:g}" for d in calibrated))
            version = self._registry.current_model_version() or ""
        if not self._fetch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many model downloads in progress; retry later")
        try:
            try:
                payload = self._model_provider(request.density)
            except LookupError as e:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no packed model at density {request.density:g}: {e}")
            digest = hashlib.sha256(payload).hexdigest()
            view = memoryview(payload)
            for offset in range(0, max(len(payload), 1), self._chunk_bytes):
                yield pb.ModelChunk(data=bytes(view[offset:offset + self._chunk_bytes]), offset=offset,
                                    total_size=len(payload), sha256=digest, model_version=version,
                                    density=request.density)
        finally:
            self._fetch_slots.release()


def serve(
    registry: Registry,
    host: str,
    port: int,
    architecture: pb.Architecture,
    model_provider: ModelProvider,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_fetches: int | None = None,
    heartbeat_s: float | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.Server:
    """Start the control plane (and the standard health service) on host:port; returns without blocking.

    Agents are idle between heartbeats, so `max_workers` bounds requests in flight, not agents.
    FetchModel streams hold a worker each for their duration: at most `max_fetches` (default half
    the workers) run at once, further ones get RESOURCE_EXHAUSTED and retry. ``heartbeat_s`` is how often
    devices are told to heartbeat (default: the run settings' default). With ``credentials`` it serves TLS only.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="control-plane"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", chunk_bytes + 64 * 1024),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share its traffic
        ],
    )
    servicer = ControlPlaneServicer(registry, architecture, model_provider, chunk_bytes,
                                    max_fetches or max(1, max_workers // 2),
                                    heartbeat_s or RunSettings.defaults().heartbeat_s)
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
