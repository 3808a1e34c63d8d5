"""Inference on the device: the Predict gRPC server, and the model behind it kept current.

One packed model holds every subnet, so a new density assignment is `set_density` (no copy, no reload);
a new model version is downloaded and verified off to the side, then swapped in under the same lock
that every forward pass holds, so a request never sees half a switch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from contracts.checked_service import add_checked_servicer
from dress_model.packed import PackedModel
from dress_model.packed_format import PackedFormatError
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb.DESCRIPTOR.services_by_name["Agent"].full_name
MAX_BATCH = 256
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a full batch of CIFAR-sized float images, with room to spare
MAX_MODEL_BYTES = 1 << 30  # a sanity bound on what a coordinator may announce, not a device limit
DEFAULT_FETCH_TIMEOUT_S = 120.0
DEFAULT_WORKERS = 4  # forward passes hold one lock; more threads would only queue
LATENCY_WINDOW = 100  # passes the latency model remembers: 2 s of requests at 50 a second


def runnable_density(densities: tuple[float, ...], assigned: float) -> float:
    """The densest stored subnet not denser than `assigned` (it must fit the budget), else the sparsest."""
    fitting = [d for d in densities if d <= assigned + 1e-9]
    return max(fitting) if fitting else min(densities)


class LatencyModel:
    """Expected milliseconds of a forward pass per density: the calibrated cost per image times the largest
    slowdown (measured over calibrated cost) of the last ``window`` passes.

    Load stretches a pass: throttling and a busy process sharing the core slow every operation, and the
    scheduler now and then makes the agent wait. Either way the slowdown is what one pass says about any other:
    load slows every subnet alike, so a sparse pass under load says the dense one would be late too, and once
    the load is gone the sparse passes bring the dense ones back (a per-density estimate would keep the dense
    subnet's last slow reading forever). The largest of the window, not its median: tails are what make
    answers late, so while slow passes keep coming only subnets with that much slack answer, and a window
    (2 s at 50 requests a second) after the last one the denser subnets are back.
    (Replayed over two sets of latencies measured at one request per 20 ms with 0-2 busy processes beside the
    agent, on the steady, bursty and battery traces of ``benchmarks/device.py``, seeds 0-4 and deadlines of
    1.5, 2 and 3 times the dense subnet's median: against the median slowdown plus the window's longest extra
    wait in ms, this model answered more accurately in 13 of 18 cases, by up to 2.6 pt, and 0.4 pt less in
    one; the worst seed was late on at most 0.97% of requests against 1.27%. A busy process delayed a dense
    pass by about the same share of it as a sparse one there.)"""

    def __init__(self, per_image_ms: dict[float, float], window: int = LATENCY_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"the latency window must be >= 1 pass, got {window}")
        self._per_image = {d: ms for d, ms in per_image_ms.items() if ms > 0}
        self._ratios: deque[float] = deque(maxlen=window)  # measured / calibrated cost, per pass
        self.slowdown = 1.0  # what a pass is expected to take over its calibrated cost

    def expected_ms(self, density: float, batch: int) -> float | None:
        per_image = self._per_image.get(density)
        return None if per_image is None else per_image * batch * self.slowdown

    def observe(self, density: float, batch: int, measured_ms: float) -> None:
        per_image = measured_ms / max(1, batch)
        base = self._per_image.get(density)
        if base is None:  # never calibrated: its cost is what it took, at today's slowdown
            if per_image > 0:
                self._per_image[density] = per_image / self.slowdown
            return
        self._ratios.append(per_image / base)
        self.slowdown = max(self._ratios)

    def densest_within(self, densities: Iterable[float], batch: int, deadline_ms: float) -> float | None:
        """The densest of ``densities`` expected to answer within ``deadline_ms``; None if none is."""
        fitting = [d for d in densities if (ms := self.expected_ms(d, batch)) is not None and ms <= deadline_ms]
        return max(fitting, default=None)


class UsageLedger:
    """What Predict ran per density since the coordinator last heard of it: (requests, busy ms).

    The heartbeat takes it; if the heartbeat fails it puts it back, so nothing is counted twice or lost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[float, tuple[int, float]] = {}

    def add(self, density: float, requests: int, busy_ms: float) -> None:
        with self._lock:
            old_requests, old_ms = self._usage.get(density, (0, 0.0))
            self._usage[density] = (old_requests + requests, old_ms + busy_ms)

    def take(self) -> dict[float, tuple[int, float]]:
        with self._lock:
            usage, self._usage = self._usage, {}
            return usage

    def put_back(self, usage: dict[float, tuple[int, float]]) -> None:
        for density, (requests, busy_ms) in usage.items():
            self.add(density, requests, busy_ms)


@dataclass(frozen=True, slots=True)
class ServedState:
    """What is served, read in one go so a concurrent swap cannot mix two models' answers."""

    density: float
    assigned_density: float
    version: str
    densities: tuple[float, ...]


class ServedModel:
    """The model Predict runs: density switches and version swaps are atomic with respect to requests."""

    def __init__(self, packed: PackedModel, assigned_density: float, version: str = "",
                 latency: LatencyModel | None = None) -> None:
        self._lock = threading.Lock()
        self._packed, self._assigned, self._version = packed, assigned_density, version
        self.latency = latency or LatencyModel({})  # what a request's deadline is judged by
        self.usage = UsageLedger()  # what ran, for the heartbeat
        packed.set_density(runnable_density(packed.densities, assigned_density))

    @property
    def packed(self) -> PackedModel:
        return self._packed

    @property
    def version(self) -> str:
        return self._version

    @property
    def assigned_density(self) -> float:
        return self._assigned

    def state(self) -> ServedState:
        with self._lock:
            return ServedState(self._packed.active_density, self._assigned, self._version, self._packed.densities)

    def set_density(self, assigned: float) -> float:
        """Follow a new assignment in O(1): the layers read a different prefix of the same buffers."""
        with self._lock:
            self._assigned = assigned
            self._packed.set_density(runnable_density(self._packed.densities, assigned))
            return self._packed.active_density

    def swap(self, packed: PackedModel, version: str) -> None:
        """Serve `packed` from the next request on, at the current assignment."""
        with self._lock:
            packed.set_density(runnable_density(packed.densities, self._assigned))
            self._packed, self._version = packed, version

    def predict(self, x: torch.Tensor, deadline_ms: float = 0.0) -> tuple[torch.Tensor, float, float]:
        """(logits, density, latency_ms) for a [N, C, H, W] batch; ValueError if it does not fit the model.

        With a deadline the densest subnet up to the assigned one that the latency model expects to meet it
        answers (the sparsest if none is expected to), for this request only: one store to switch, one back."""
        if not (math.isfinite(deadline_ms) and deadline_ms >= 0):
            raise ValueError(f"deadline_ms must be a finite number >= 0 (0: none), got {deadline_ms}")
        with self._lock:
            arch = self._packed.arch
            expected = (arch.in_channels, arch.image_size, arch.image_size)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"input shape {list(x.shape[1:])} does not match the model's "
                                 f"[C, H, W] = {list(expected)}")
            assigned = self._packed.active_density
            density = assigned
            if deadline_ms > 0:
                allowed = [d for d in self._packed.densities if d <= assigned + 1e-9]
                density = self.latency.densest_within(allowed, x.shape[0], deadline_ms) or min(allowed)
            self._packed.set_density(density)
            try:
                start = time.perf_counter()
                logits = self._packed(x)
                latency_ms = 1000 * (time.perf_counter() - start)
            finally:
                self._packed.set_density(assigned)
            self.latency.observe(density, x.shape[0], latency_ms)
            self.usage.add(density, 1, latency_ms)
            return logits, density, latency_ms


class ModelFetchError(RuntimeError):
    """A model download failed or arrived corrupt; the served model stays as it was."""


@dataclass(frozen=True, slots=True)
class FetchedModel:
    version: str
    packed: PackedModel
    nbytes: int


def fetch_model(
    stub: pb_grpc.ControlPlaneStub, device_id: int, density: float, timeout: float = DEFAULT_FETCH_TIMEOUT_S,
    half: bool = False,
) -> FetchedModel:
    """Download the packed model at `density` over FetchModel, checking order, size and sha256 before use;
    ``half``: as float16 (fewer bytes, computed in float32)."""
    data = bytearray()
    first: pb.ModelChunk | None = None
    try:
        for chunk in stub.FetchModel(pb.FetchModelRequest(device_id=device_id, density=density, float16=half),
                                    timeout=timeout):
            if first is None:
                first = chunk
                if chunk.total_size > MAX_MODEL_BYTES:
                    raise ModelFetchError(f"coordinator announced a {chunk.total_size:,}-byte model; "
                                          f"at most {MAX_MODEL_BYTES:,} accepted")
            elif (chunk.total_size, chunk.sha256, chunk.model_version) != (
                    first.total_size, first.sha256, first.model_version):
                raise ModelFetchError("model chunks disagree on size, digest or version; the model changed mid-download")
            if chunk.offset != len(data) or len(data) + len(chunk.data) > first.total_size:
                raise ModelFetchError(f"chunk of {len(chunk.data)} bytes at offset {chunk.offset} does not follow "
                                      f"the {len(data)} bytes received of {first.total_size}")
            data += chunk.data
    except grpc.RpcError as e:
        raise ModelFetchError(f"FetchModel at density {density:g} failed: {e.code().name}: {e.details()}") from None
    if first is None:
        raise ModelFetchError("FetchModel answered no chunks")
    if len(data) != first.total_size:
        raise ModelFetchError(f"model download ended after {len(data):,} of {first.total_size:,} bytes")
    if hashlib.sha256(data).hexdigest() != first.sha256:
        raise ModelFetchError(f"model {first.model_version!r} failed its sha256 check; discarded")
    try:
        packed = PackedModel.from_bytes(bytes(data), source=f"model {first.model_version!r}")
    except PackedFormatError as e:
        raise ModelFetchError(str(e)) from None
    return FetchedModel(first.model_version, packed, len(data))


class ModelUpdater:
    """Brings a ServedModel to a newly published version: the monitor's `on_model_version`.

    It downloads at `fetch_density`, the densest subnet the device calibrated, so every density the
    coordinator may assign later is a `set_density` away rather than another download.
    """

    def __init__(self, served: ServedModel, stub: pb_grpc.ControlPlaneStub, device_id: int,
                 fetch_density: float, timeout: float = DEFAULT_FETCH_TIMEOUT_S, half: bool = False) -> None:
        self.served, self.stub, self.device_id = served, stub, device_id
        self.fetch_density, self.timeout, self.half = fetch_density, timeout, half

    def __call__(self, version: str) -> None:
        if version == self.served.version:
            return
        fetched = fetch_model(self.stub, self.device_id, self.fetch_density, self.timeout, self.half)
        fetched.packed.compile()  # before it serves: no request pays for compiling its density
        self.served.swap(fetched.packed, fetched.version)
        log.info("serving model version %s (%s bytes, densities %s)", fetched.version, f"{fetched.nbytes:,}",
                 ", ".join(f"{d:g}" for d in fetched.packed.densities))


@dataclass(slots=True)
class AgentIdentity:
    """Who this agent is to the coordinator, for Status (its id changes if it has to register again)."""

    name: str
    device_id: int
    profile: str


def input_tensor(request: agent_pb.PredictRequest) -> torch.Tensor:
    """The request as a [N, C, H, W] float tensor; ValueError saying what is wrong otherwise."""
    shape = list(request.shape)
    if not request.input:
        raise ValueError("input is empty")
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f"shape must be [C, H, W] or [N, C, H, W] of positive sizes, got {shape}")
    if len(shape) == 3:
        shape = [1, *shape]
    if shape[0] > MAX_BATCH:
        raise ValueError(f"batch of {shape[0]} images; at most {MAX_BATCH} per request")
    if math.prod(shape) != len(request.input):
        raise ValueError(f"shape {list(request.shape)} needs {math.prod(shape)} values, got {len(request.input)}")
    values = np.asarray(request.input, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"input holds {int((~np.isfinite(values)).sum())} NaN or infinite values")
    return torch.from_numpy(values).reshape(shape)


class AgentServicer(agent_grpc.AgentServicer):
    def __init__(self, served: ServedModel, identity: AgentIdentity) -> None:
        self.served, self.identity = served, identity

    def Predict(self, request: agent_pb.PredictRequest, context: grpc.ServicerContext) -> agent_pb.PredictResponse:
        try:
            logits, density, latency_ms = self.served.predict(input_tensor(request), request.deadline_ms)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return agent_pb.PredictResponse(logits=logits.reshape(-1).tolist(), shape=list(logits.shape),
                                        density=density, latency_ms=latency_ms)

    def Status(self, request: agent_pb.StatusRequest, context: grpc.ServicerContext) -> agent_pb.StatusResponse:
        state = self.served.state()
        return agent_pb.StatusResponse(
            name=self.identity.name, device_id=self.identity.device_id, profile=self.identity.profile,
            density=state.density, assigned_density=state.assigned_density, model_version=state.version,
            densities=list(state.densities))


@dataclass
class AgentServer:
    """The running Predict server; `port` is the one bound (useful when asked for port 0)."""

    server: grpc.Server
    health: health.HealthServicer
    port: int

    def stop(self, grace: float = 2.0) -> None:
        """Tell health checkers first, then let requests in flight finish within `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def serve(
    served: ServedModel, identity: AgentIdentity, host: str, port: int, max_workers: int = DEFAULT_WORKERS,
    credentials: grpc.ServerCredentials | None = None,
) -> AgentServer:
    """Start Agent (and the standard health service, SERVING from the start) on host:port; non-blocking.

    With ``credentials`` (runtime.certificates.mutual_server_credentials) it serves TLS only and answers only callers
    whose client certificate the fleet CA signed; without, plaintext, which the agent allows on loopback only."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="agent-predict"),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
    )
    add_checked_servicer(AgentServicer(served, identity), server, agent_pb.DESCRIPTOR.services_by_name["Agent"])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"agent could not bind {address}")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("agent serving %s on %s:%d", SERVICE_NAME, host, bound)
    return AgentServer(server, health_servicer, bound)
