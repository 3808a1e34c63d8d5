"""The operator's host in test_fleet_bad_network.py: what a caller on another machine gets from a TLS fleet.

Run inside the operator's network namespace, it asks the coordinator's control plane and SuperLink address and
every agent's Predict address, each with the right credentials and without, and prints one JSON object of what
came back (the test judges it). An outcome is "OK" or the gRPC status code's name; a refusal counts only beside
an "OK" on the same address, which shows the address was reachable. With --register-secret (a device's
credential) it also tries to register that device with no SuperNode key and with a malformed one.

    python tests/netns_operator.py --certs DIR --control HOST:PORT --superlink HOST:PORT \
        --agent pi-1=HOST:PORT ... [--model-version V] [--register-secret CREDENTIAL]
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contracts.credentials import with_bearer
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

IMAGE_SHAPE = (1, 28, 28)  # a Fashion-MNIST image, the fleet's dataset in the test
CALL_TIMEOUT_S = 10.0


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as e:
        return e.code().name
    return "OK"


def health(channel: grpc.Channel, timeout: float = CALL_TIMEOUT_S) -> object:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)


def control_plane(address: str, ca: bytes, secret: str | None) -> dict[str, Any]:
    """Health over TLS (the reachable case), then a call without a credential and one in plaintext; with a
    device's ``secret``, Register offering no SuperNode key and a malformed one ([code, details] of each)."""
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        served = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60,
                                                           wait_for_ready=True)
        no_secret = outcome(lambda: pb_grpc.ControlPlaneStub(channel).Describe(pb.DescribeRequest(),
                                                                                timeout=CALL_TIMEOUT_S))
        bad_keys = {} if secret is None else register_bad_keys(channel, secret)
    with grpc.insecure_channel(address) as channel:
        plaintext = outcome(lambda: health(channel, timeout=5))
    return {"tls_health": health_pb2.HealthCheckResponse.ServingStatus.Name(served.status),
            "no_credential": no_secret, "plaintext": plaintext, **({"bad_keys": bad_keys} if bad_keys else {})}


def register_bad_keys(channel: grpc.Channel, secret: str) -> dict[str, list[str]]:
    """Register as the device ``secret`` proves, with a calibration of every level the fleet has, offering no
    SuperNode key and then one that is not an OpenSSH public key: [code, details] of each answer."""
    stub = pb_grpc.ControlPlaneStub(with_bearer(channel, lambda: secret))
    levels = len(stub.Describe(pb.DescribeRequest(), timeout=CALL_TIMEOUT_S).architecture.densities)
    calibration = [pb.CalibrationPoint(level=level, latency_ms=10, memory_mb=100) for level in range(levels)]
    answers = {}
    for key in ("", "ssh-rsa AAAA"):
        try:
            stub.Register(pb.RegisterRequest(supernode_public_key=key, calibration=calibration, profile="pi4"),
                          timeout=30)
            answers[key] = ["OK", ""]
        except grpc.RpcError as e:
            answers[key] = [e.code().name, e.details() or ""]
    return answers


def superlink(address: str, ca: Path) -> dict[str, int]:
    """HTTP statuses of GET /health over TLS verified against the fleet CA, and in plaintext."""
    with urllib.request.urlopen(f"https://{address}/health", timeout=CALL_TIMEOUT_S,
                                context=ssl.create_default_context(cafile=str(ca))) as answer:
        https = answer.status
    host, _, port = address.rpartition(":")
    plain = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        plain.request("GET", "/health")
        plaintext = plain.getresponse().status
    finally:
        plain.close()
    return {"https_health": https, "plain_http_health": plaintext}


def agent(address: str, ca: bytes, cert: bytes, key: bytes, model_version: str | None,
          wait_s: float) -> dict[str, Any]:
    """Status and Predict over mutual TLS (waiting up to ``wait_s`` for it to serve ``model_version``), then
    Status with the CA but no client certificate, and in plaintext."""
    mutual = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(address, mutual) as channel:
        stub = agent_grpc.AgentStub(channel)
        deadline = time.monotonic() + wait_s
        while True:
            status = stub.Status(agent_pb.StatusRequest(), timeout=60, wait_for_ready=True)
            if model_version is None or status.model_version == model_version or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        size = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        answer = stub.Predict(agent_pb.PredictRequest(input=[0.5] * size, shape=list(IMAGE_SHAPE)),
                              timeout=CALL_TIMEOUT_S)
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        no_client_cert = outcome(lambda: agent_grpc.AgentStub(channel).Status(agent_pb.StatusRequest(), timeout=5))
    with grpc.insecure_channel(address) as channel:
        plaintext = outcome(lambda: agent_grpc.AgentStub(channel).Status(agent_pb.StatusRequest(), timeout=5))
    return {"name": status.name, "profile": status.profile, "density": status.density,
            "model_version": status.model_version, "predict_density": answer.density,
            "predict_shape": list(answer.shape), "no_client_cert": no_client_cert, "plaintext": plaintext}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--certs", type=Path, required=True, help="ca.pem, and operator.pem/.key (a client certificate)")
    p.add_argument("--control", required=True)
    p.add_argument("--superlink", required=True)
    p.add_argument("--agent", action="append", default=[], help="NAME=HOST:PORT")
    p.add_argument("--model-version", default=None, help="wait until every agent serves this version")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it")
    p.add_argument("--register-secret", default=None, help="a device's credential: try to register bad keys")
    args = p.parse_args()
    ca = (args.certs / "ca.pem").read_bytes()
    cert, key = (args.certs / "operator.pem").read_bytes(), (args.certs / "operator.key").read_bytes()
    agents = dict(a.split("=", 1) for a in args.agent)
    print(json.dumps({
        "control_plane": control_plane(args.control, ca, args.register_secret),
        "superlink": superlink(args.superlink, args.certs / "ca.pem"),
        "agents": {name: agent(address, ca, cert, key, args.model_version, args.wait)
                   for name, address in agents.items()},
    }))


if __name__ == "__main__":
    main()
