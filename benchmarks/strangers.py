"""Strangers' requests at every listener: fuzzed control-plane requests (each must end in a status, never an
unhandled exception), callers without a valid credential or as another device at the control plane, callers without
the fleet's client certificate at an agent's Predict, SuperNodes whose keys nobody registered at a TLS SuperLink,
callers without an operator's credential on every route of the coordinator's operator listener (dashboard, API,
metrics). Each stranger must be refused and change nothing. Part of benchmarks/reliability.py.
"""

from __future__ import annotations

import http.client
import random
import ssl
import subprocess
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc

from agent.served_model import ServedModel
from agent.serving import AgentIdentity
from agent.serving import serve as serve_agent
from benchmarks.packed_fuzz import HANG_S, packed_model
from contracts.credentials import SCHEME, bearer, supernode_key
from contracts.policy import CalibrationPoint
from contracts.wire import calibration_to_proto
from coordinator.control_plane import SERVICE_NAME, serve
from coordinator.metrics import FleetMetrics
from coordinator.operator_api import COOKIE, OperatorListener, operator_app
from coordinator.registry import Registry
from dress_model.models import architecture_for_dataset
from dress_model.packed import PackedModel
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from runtime.certificates import init_certificates, issue_certificate, mutual_server_credentials
from runtime.processes import flwr, pick_port, start_superlink, start_supernode

CALIBRATION = [CalibrationPoint(d, 100 * d, 800 * d) for d in (1.0, 0.5, 0.25, 0.1)]
FLEET = architecture_for_dataset("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 4)  # what the control plane serves


def _requests(rng: random.Random) -> list[tuple[str, bytes]]:
    """Valid requests of every method, to mutate; levels a caller might ask for."""
    budget = pb.Budget(latency_ms=50, memory_mb=400, battery=0.5)
    calibration = calibration_to_proto(CALIBRATION, FLEET.densities)
    return [
        ("Describe", pb.DescribeRequest().SerializeToString()),
        ("Register", pb.RegisterRequest(name="pi-kitchen", profile="pi4", calibration=calibration).SerializeToString()),
        ("Heartbeat", pb.HeartbeatRequest(budget=budget).SerializeToString()),
        ("FetchModel", pb.FetchModelRequest(level=rng.randint(0, 5)).SerializeToString()),
    ]


def _control_plane(registry: Registry, payload: bytes) -> tuple[grpc.Server, str]:
    port = pick_port()
    server = serve(registry, "127.0.0.1", port, FLEET, lambda version, density, half: payload, max_workers=4)
    return server, f"127.0.0.1:{port}"


def _enrolled(channel: grpc.Channel, registry: Registry, name: str) -> tuple[int, str]:
    """A device registered the way an agent does: (its id, its credential)."""
    token = registry.enroll([name])[name]
    calibration = calibration_to_proto(CALIBRATION, FLEET.densities)
    reply = pb.RegisterResponse.FromString(channel.unary_unary(f"/{SERVICE_NAME}/Register")(
        pb.RegisterRequest(profile="pi4", calibration=calibration).SerializeToString(), metadata=bearer(token),
        timeout=HANG_S))
    return reply.device_id, reply.credential


def fuzz_grpc(count: int, seed: int) -> dict[str, Any]:
    """Send ``count`` spoilt requests to a real control plane, half of them with a real device's credential (so
    they reach the handlers); each must end in a status, none in a crash."""
    rng = random.Random(seed)
    payload = packed_model(seed)
    codes: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp, Registry(f"sqlite:///{tmp}/registry.sqlite3") as registry:
        server, address = _control_plane(registry, payload)
        try:
            with grpc.insecure_channel(address) as channel:
                _, credential = _enrolled(channel, registry, "pi-kitchen")
                for _ in range(count):
                    method, valid = rng.choice(_requests(rng))
                    body = bytearray(valid if rng.random() < 0.7 else rng.randbytes(rng.randrange(0, 256)))
                    for _ in range(rng.randint(0, 8)):
                        if body:
                            body[rng.randrange(len(body))] = rng.randrange(256)
                    path = f"/{SERVICE_NAME}/{method}"
                    call = channel.unary_stream(path) if method == "FetchModel" else channel.unary_unary(path)
                    metadata = bearer(credential) if rng.random() < 0.5 else None
                    try:
                        answer = call(bytes(body), timeout=HANG_S, metadata=metadata)
                        if method == "FetchModel":
                            list(answer)
                        codes["OK"] += 1
                    except grpc.RpcError as e:
                        codes[e.code().name] += 1
                alive = pb.DescribeResponse.FromString(channel.unary_unary(f"/{SERVICE_NAME}/Describe")(
                    pb.DescribeRequest().SerializeToString(), timeout=HANG_S, metadata=bearer(credential)))
        finally:
            server.stop(grace=None).wait()
    crashes = codes["UNKNOWN"] + codes["INTERNAL"] + codes["DEADLINE_EXCEEDED"]
    return {"tried": count, "crashes": crashes, "codes": dict(sorted(codes.items())),
            "still_serving": alive.architecture.name == "cnn"}


STRANGERS = ("no credential", "forged credential", "forged token", "spent token", "expired token",
             "another device's name")  # no request names a device by id: a credential acts only as its own


def strangers(count: int, seed: int, superlink_tries: int = 4) -> dict[str, Any]:
    """Strangers at every listener: the control plane (``count`` calls), an agent's Predict over mutual TLS
    (``count`` calls), a TLS SuperLink with SuperNode authentication (``superlink_tries`` SuperNodes) and the
    coordinator's operator listener (``count`` requests)."""
    parts = {"control-plane": control_plane_strangers(count, seed), "predict": predict_strangers(count, seed),
             "superlink": unregistered_supernodes(superlink_tries), "dashboard": operator_strangers(count, seed)}
    return {"tried": sum(p["tried"] for p in parts.values()), "refused": sum(p["refused"] for p in parts.values()),
            "where": parts}


PREDICT_STRANGERS = ("plaintext", "no client certificate", "another CA's client", "a server certificate as client")


def predict_strangers(count: int, seed: int) -> dict[str, Any]:
    """``count`` Status calls to an agent's Predict listener on mutual TLS by callers without the fleet's client
    certificate; refused = no answer (the TLS handshake fails: UNAVAILABLE)."""
    codes: Counter[str] = Counter()
    refused = 0
    with tempfile.TemporaryDirectory() as tmp:
        fleet, other = Path(tmp) / "fleet", Path(tmp) / "other"
        init_certificates(fleet, [])
        init_certificates(other, [])
        cert, key = issue_certificate(fleet, "agent", [], client=False)
        foreign_cert, foreign_key = issue_certificate(other, "app", [], client=True)
        ca = (fleet / "ca.pem").read_bytes()
        served = ServedModel(PackedModel.from_bytes(packed_model(seed)), 1.0)
        server = serve_agent(served, AgentIdentity("pi-kitchen", 7, "pi4"), "127.0.0.1", 0,
                             credentials=mutual_server_credentials(fleet / "ca.pem", cert, key))
        address = f"127.0.0.1:{server.port}"
        kinds = {
            "plaintext": lambda: grpc.insecure_channel(address),
            "no client certificate": lambda: grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),
            "another CA's client": lambda: grpc.secure_channel(address, grpc.ssl_channel_credentials(
                ca, foreign_key.read_bytes(), foreign_cert.read_bytes())),
            "a server certificate as client": lambda: grpc.secure_channel(address, grpc.ssl_channel_credentials(
                ca, key.read_bytes(), cert.read_bytes())),
        }
        try:
            for i in range(count):
                with kinds[PREDICT_STRANGERS[i % len(PREDICT_STRANGERS)]]() as channel:
                    try:
                        agent_grpc.AgentStub(channel).Status(agent_pb.StatusRequest(), timeout=HANG_S)
                        codes["OK"] += 1
                    except grpc.RpcError as e:
                        codes[e.code().name] += 1
                        refused += e.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            server.stop(grace=0)
    return {"tried": count, "refused": refused, "kinds": list(PREDICT_STRANGERS), "codes": dict(sorted(codes.items()))}


def unregistered_supernodes(tries: int) -> dict[str, Any]:
    """SuperNodes with a key nobody registered, and with none, against a TLS SuperLink with SuperNode
    authentication; refused = Flower turns it away (it never appears among the SuperLink's nodes)."""
    refused = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        certs = init_certificates(root / "certs", [])
        port = pick_port()
        superlink = start_superlink(root / "link", "127.0.0.1", port, certs=certs)
        try:
            for i in range(tries):
                key_file, _ = supernode_key(root / f"stranger-{i}")
                node = start_supernode(root / f"stranger-{i}", f"127.0.0.1:{port}", pick_port(), {}, f"stranger-{i}",
                                       root_ca=certs.ca, auth_key=key_file if i % 2 == 0 else None)
                try:
                    node.proc.wait(timeout=60)  # Flower's SuperNode exits when the SuperLink turns it away
                except subprocess.TimeoutExpired:
                    pass
                finally:
                    node.stop()
                admitted = flwr(root / "link", "supernode", "ls", "local")["nodes"]
                refused += "could not establish a connection" in node.tail() and not admitted
        finally:
            superlink.stop()
    return {"tried": tries, "refused": refused, "kinds": ["unregistered key", "no key"]}


def control_plane_strangers(count: int, seed: int) -> dict[str, Any]:
    """``count`` calls by strangers (each kind in ``STRANGERS`` in turn, on a random method) to a real control plane
    where a victim device is registered; refused = UNAUTHENTICATED or PERMISSION_DENIED with the victim's row,
    history and the device list unchanged."""
    rng = random.Random(seed)
    refused, codes = 0, Counter[str]()
    with tempfile.TemporaryDirectory() as tmp, Registry(f"sqlite:///{tmp}/registry.sqlite3") as registry:
        server, address = _control_plane(registry, packed_model(seed))
        try:
            with grpc.insecure_channel(address) as channel:
                victim, _ = _enrolled(channel, registry, "pi-kitchen")
                _, mallory = _enrolled(channel, registry, "mallory")
                spent = registry.enroll(["spent"])["spent"]
                as_pi4 = pb.RegisterRequest(profile="pi4", calibration=calibration_to_proto(CALIBRATION, FLEET.densities))
                channel.unary_unary(f"/{SERVICE_NAME}/Register")(as_pi4.SerializeToString(),
                                                                  metadata=bearer(spent), timeout=HANG_S)
                expired = registry.enroll(["late"], ttl=timedelta(microseconds=1))["late"]
                presented = {"no credential": None, "forged credential": "dfd_" + rng.randbytes(32).hex(),
                           "forged token": "dfe_" + rng.randbytes(32).hex(), "spent token": spent,
                           "expired token": expired, "another device's name": mallory}
                before = (registry.list_devices(), registry.device_history(victim))
                for i in range(count):
                    kind = STRANGERS[i % len(STRANGERS)]
                    if kind == "another device's name":
                        method, body = "Register", pb.RegisterRequest(name="pi-kitchen", profile="pi4",
                                                                      calibration=as_pi4.calibration)
                    else:
                        method, body = rng.choice([
                            ("Describe", pb.DescribeRequest()),
                            ("Register", pb.RegisterRequest(name="pi-kitchen", profile="pi4",
                                                            calibration=as_pi4.calibration)),
                            ("Heartbeat", pb.HeartbeatRequest(budget=pb.Budget(latency_ms=1, memory_mb=1))),
                            ("FetchModel", pb.FetchModelRequest(level=3))])
                    path = f"/{SERVICE_NAME}/{method}"
                    call = channel.unary_stream(path) if method == "FetchModel" else channel.unary_unary(path)
                    secret = presented[kind]
                    try:
                        answer = call(body.SerializeToString(), timeout=HANG_S,
                                      metadata=bearer(secret) if secret else None)
                        if method == "FetchModel":
                            list(answer)
                        codes["OK"] += 1
                    except grpc.RpcError as e:
                        codes[e.code().name] += 1
                        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and \
                                (registry.list_devices(), registry.device_history(victim)) == before:
                            refused += 1
        finally:
            server.stop(grace=None).wait()
    return {"tried": count, "refused": refused, "kinds": list(STRANGERS), "codes": dict(sorted(codes.items()))}


OPERATOR_STRANGERS = ("no credential", "forged bearer", "forged cookie", "a device's credential",
                      "a removed operator's credential", "the operator's credential in plaintext")
PUBLIC_ROUTES = ("/login", "/logout", "/static/style.css")  # the sign-in page and what it needs: nothing of the fleet


def operator_strangers(count: int, seed: int) -> dict[str, Any]:
    """``count`` requests by strangers (each kind in ``OPERATOR_STRANGERS`` in turn) to the coordinator's operator
    listener on TLS, over every route but the sign-in page's (GET each, and POST /login with the stranger's
    secret); refused = no HTTP answer, a 4xx, or for a browser's page a redirect to /login, with nothing of the fleet
    in the answer (no device or operator name). The operator is still answered at the end."""
    rng = random.Random(seed)
    codes: Counter[str] = Counter()
    refused = 0
    with tempfile.TemporaryDirectory() as tmp, Registry(f"sqlite:///{tmp}/registry.sqlite3") as registry:
        certs = init_certificates(Path(tmp) / "certs", [])
        operator, removed = registry.add_operator("alice"), registry.add_operator("bob")
        registry.remove_operator("bob")
        server, address = _control_plane(registry, packed_model(seed))
        try:
            with grpc.insecure_channel(address) as channel:
                _, device = _enrolled(channel, registry, "pi-kitchen")
        finally:
            server.stop(grace=None).wait()
        app = operator_app(registry, FleetMetrics(registry))
        asked = [("GET", r.path.replace("{name}", "pi-kitchen")) for r in app.routes
                 if "GET" in getattr(r, "methods", ()) and r.path not in PUBLIC_ROUTES] + [("POST", "/login")]
        listener = OperatorListener(app, "127.0.0.1", pick_port(), certs).start()
        host, port = listener.address.rsplit(":", 1)
        tls = ssl.create_default_context(cafile=str(certs.ca))
        presented = {"no credential": None, "forged bearer": "dfo_" + rng.randbytes(32).hex(),
                     "forged cookie": "dfo_" + rng.randbytes(32).hex(), "a device's credential": device,
                     "a removed operator's credential": removed, "the operator's credential in plaintext": operator}

        def ask(kind: str, method: str, path: str) -> tuple[int, str, bytes]:
            """(HTTP status, where it redirects, body) of one request; status 0 where no HTTP answered at all."""
            secret, headers, body = presented[kind], {}, None
            if method == "POST":  # the sign-in form, with the stranger's secret
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                body = urlencode({"credential": secret or ""})
            elif kind == "forged cookie":
                headers["Cookie"] = f"{COOKIE}={secret}"
            elif secret:
                headers["Authorization"] = SCHEME + secret
            conn = (http.client.HTTPConnection(host, int(port), timeout=HANG_S) if kind.endswith("plaintext")
                    else http.client.HTTPSConnection(host, int(port), timeout=HANG_S, context=tls))
            try:
                conn.request(method, path, body=body, headers=headers)
                answer = conn.getresponse()
                return answer.status, answer.getheader("location", ""), answer.read()
            except (OSError, http.client.HTTPException):
                return 0, "", b""
            finally:
                conn.close()

        try:
            for i in range(count):
                kind = OPERATOR_STRANGERS[i % len(OPERATOR_STRANGERS)]
                method, path = asked[i // len(OPERATOR_STRANGERS) % len(asked)]  # every kind on every route
                status, location, body = ask(kind, method, path)
                codes[str(status) if status else "no HTTP answer"] += 1
                turned_away = status == 0 or 400 <= status < 500 or (status == 303 and location == "/login")
                refused += turned_away and b"pi-kitchen" not in body and b"alice" not in body
            presented["the operator"] = operator
            still_serving = ask("the operator", "GET", "/api/devices")[0] == 200
        finally:
            listener.stop()
    return {"tried": count, "refused": refused, "kinds": list(OPERATOR_STRANGERS), "routes": asked,
            "public": list(PUBLIC_ROUTES), "codes": dict(sorted(codes.items())), "still_serving": still_serving}
