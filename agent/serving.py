"""Inference on the device: the Predict and Status gRPC server in front of the served model."""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.metrics import AgentMetrics
from agent.served_model import ServedModel
from contracts.checked_service import add_checked_servicer
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb.DESCRIPTOR.services_by_name["Agent"].full_name


MAX_BATCH = 256


MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a full batch of CIFAR-sized float images, with room to spare


DEFAULT_WORKERS = 4  # forward passes hold one lock; more threads would only queue


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
    def __init__(self, served: ServedModel, identity: AgentIdentity, metrics: AgentMetrics | None = None) -> None:
        self.served, self.identity, self.metrics = served, identity, metrics

    def Predict(self, request: agent_pb.PredictRequest, context: grpc.ServicerContext) -> agent_pb.PredictResponse:
        try:
            logits, density, latency_ms = self.served.predict(input_tensor(request), request.deadline_ms)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.metrics is not None:
            self.metrics.predicted(density, latency_ms, request.deadline_ms)
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
    credentials: grpc.ServerCredentials | None = None, metrics: AgentMetrics | None = None,
) -> AgentServer:
    """Start Agent (and the standard health service, SERVING from the start) on host:port; non-blocking.

    With ``credentials`` (runtime.certificates.mutual_server_credentials) it serves TLS only and answers only callers
    whose client certificate the fleet CA signed; without, plaintext, which the agent allows on loopback only."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="agent-predict"),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
    )
    add_checked_servicer(AgentServicer(served, identity, metrics), server, agent_pb.DESCRIPTOR.services_by_name["Agent"])
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
