"""What strangers, crashes and poisoned devices can do to the fleet: fuzzed and crafted packed files, fuzzed
control-plane requests, strangers at every listener (the public SuperLink address from another host too),
poisoned replies in the real aggregation path in rounds of 1, 2 and 3+ replies, kill -9 during rounds.
Seeded, bounded in count and time, loopback or network namespaces made here only.

    python -m benchmarks.reliability                  # writes benchmarks/results/reliability.{json,md}
    python -m benchmarks.reliability --packed 100 --crafted 20 --grpc 100 --poisoned 20 --poisoned-by-replies 10 \
        --superlink 20 --faults 0 --byzantine 0       # a short form

A *crash* is anything but the clear refusal each layer promises — ``PackedFormatError`` from the packed loader;
a gRPC status other than UNKNOWN/INTERNAL from the control plane (an unhandled exception in a handler); a reply
check (``RejectedUpdate``) in the aggregation — or taking longer than ``HANG_S``. *Strangers* call the control
plane without a credential, with forged, spent or expired secrets, or as another device (each must be refused,
UNAUTHENTICATED or PERMISSION_DENIED, and change nothing); call an agent's Predict on mutual TLS without the
fleet's client certificate; or connect SuperNodes whose keys nobody registered. *Faults* (benchmarks/faults.py)
kill agents and the coordinator at random during rounds. *Byzantine* devices (benchmarks/byzantine.py) reply the
reverse of their honest update in a simulated fleet; robust aggregation must keep accuracy near the clean run's.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from agent.served_model import ServedModel
from agent.serving import AgentIdentity
from agent.serving import serve as serve_agent
from benchmarks.byzantine import RUNS as BYZANTINE_RUNS
from benchmarks.byzantine import run_byzantine
from benchmarks.common import command, machine, markdown_table, peak_rss_above_idle, write_json
from benchmarks.faults import run_faults
from benchmarks.superlink_strangers import superlink_strangers
from contracts.credentials import bearer, supernode_key
from contracts.messages import train_config
from contracts.policy import CalibrationPoint
from contracts.settings import RunSettings, build_run_model
from contracts.wire import calibration_to_proto
from coordinator.control_plane import SERVICE_NAME, serve
from coordinator.fleet_strategy import RoundStats
from coordinator.registry import Registry
from coordinator.strategy import DressStrategy
from coordinator.validation import STATISTICS, implausible
from dress_model.checkpoint import atomic_write
from dress_model.models import Architecture, architecture_for_dataset
from dress_model.packed import PackedModel, pack_checkpoint
from dress_model.packed_format import PackedFormatError, index_bits, packed_index_bytes
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from runtime.certificates import init_certificates, issue_certificate, mutual_server_credentials
from runtime.processes import flwr, pick_port, start_superlink, start_supernode
from runtime.task_identity import task_identity

RESULTS = Path(__file__).parent / "results"
HANG_S = 5.0
CALIBRATION = [CalibrationPoint(d, 100 * d, 800 * d) for d in (1.0, 0.5, 0.25, 0.1)]
FLEET = architecture_for_dataset("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 4)  # what the control plane serves


# -- packed files ------------------------------------------------------------------------------------------------


def _mutations(rng: random.Random, data: bytes) -> Callable[[], bytes]:
    """One random way to spoil a packed file: its header's JSON edited, bytes flipped, cut, or garbage."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])

    def with_header(edit: Callable[[dict], None]) -> bytes:
        h = json.loads(json.dumps(header))
        edit(h)
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n :]

    def edit_architecture(h: dict) -> None:
        arch = json.loads(h["__metadata__"]["dress"])
        key = rng.choice(["width", "image_size", "in_channels", "num_classes", "densities", "name", "bn_affine"])
        arch["architecture"][key] = rng.choice([0, -1, 7.0, 10**9, 2**31, "x", None, [], [7.0], [0.5, 0.1],
                                                [float("nan")], 1024, 3.5, True])
        h["__metadata__"]["dress"] = json.dumps(arch)

    def edit_tensor(h: dict) -> None:
        key = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(["shape", "dtype", "data_offsets"])
        h[key][field] = rng.choice([[0], [10**12], [-1], [3, 3], "F64", "I8", "BOOL", [0, 10**12], [5, 2], []])

    def flip() -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)

    choices: list[Callable[[], bytes]] = [
        lambda: with_header(edit_architecture),
        lambda: with_header(edit_tensor),
        flip,
        lambda: data[: rng.randrange(len(data))],
        lambda: rng.randbytes(rng.randrange(1, 4096)),
        lambda: struct.pack("<Q", rng.choice([0, 2**63, len(data)])) + data[8:],
    ]
    return rng.choice(choices)


def _packed_model(seed: int) -> bytes:
    """A small fleet model's packed bytes, seeded."""
    torch.manual_seed(seed)
    return pack_checkpoint(build_run_model(RunSettings.defaults(width=4))).to_bytes()


def fuzz_packed(count: int, seed: int) -> dict[str, Any]:
    """Load ``count`` spoilt packed files; whatever loads must also run every subnet."""
    rng = random.Random(seed)
    data = _packed_model(seed)
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    image = torch.randn(2, 1, 28, 28)
    for _ in range(count):
        spoilt = _mutations(rng, data)()
        start = time.perf_counter()
        try:
            packed = PackedModel.from_bytes(spoilt, "fuzzed")
            for density in packed.densities:
                packed.set_density(density)
                packed(image)
            outcomes["loaded"] += 1
        except PackedFormatError:
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is what this benchmark looks for
            outcomes["crashed"] += 1
            crashes.append(f"{type(e).__name__}: {e}"[:200])
        if time.perf_counter() - start > HANG_S:
            outcomes["hung"] += 1
    return {"tried": count, "crashes": outcomes["crashed"] + outcomes["hung"], "refused": outcomes["refused"],
            "loaded": outcomes["loaded"], "examples": crashes[:5]}


CRAFTED_DENSITIES = ([0.1, 0.25, 0.5, 1.0], [1.0], [0.5, 1.0], [0.01, 0.1], [0.001], [0.0001])
FILL_BYTES = 16 * 2**20  # a crafted file carries every byte its header declares when they come to at most this


def declaring(data: bytes, changes: dict[str, Any], half: bool = False, fill: bool = False) -> bytes:
    """``data`` (a real packed file) with ``changes`` in its header's architecture and a tensor table that agrees
    with them (every shape, dtype and offset), over the file's own tensor bytes, or, when ``fill`` and they come to
    at most ``FILL_BYTES``, over zeros filling every byte the table declares: only the size gives it away."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["dress"])
    header["architecture"].update(changes)
    with torch.device("meta"):
        packed = PackedModel(Architecture.from_json(header["architecture"]))
    tensors = {k: t for k, t in packed.net.state_dict().items() if not k.endswith(".bands")}
    for name, layer in packed.packed_layers():
        tensors[f"{name}.indices"] = torch.empty(packed_index_bytes(layer.stored_indices, index_bits(layer.cols)),
                                                 dtype=torch.uint8, device="meta")
    table, offset = {"__metadata__": {"dress": json.dumps(header)}}, 0
    for key, t in sorted(tensors.items()):
        dtype, size = {torch.float32: ("F16", 2) if half else ("F32", 4), torch.uint8: ("U8", 1),
                       torch.int64: ("I64", 8)}[t.dtype]
        table[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * size]}
        offset += t.numel() * size
    raw = json.dumps(table).encode()
    return struct.pack("<Q", len(raw)) + raw + (bytes(offset) if fill and offset <= FILL_BYTES else data[8 + n :])


def _crafted(rng: random.Random, bases: dict[str, bytes]) -> bytes:
    """A real small model's file declaring a model far past every one this project ships, along one of the axes
    a header controls: width, classes, image size (the CNN's classifier input) or depth (resnet8 as resnet20)."""
    name = rng.choice(sorted(bases))
    changes: dict[str, Any] = {"width": rng.choice([1024, 2048, 4096]), "densities": rng.choice(CRAFTED_DENSITIES)}
    axis = rng.choice(["width", "classes", "images" if name == "cnn" else "depth"])
    if axis == "classes":
        changes.update(width=rng.choice([256, 1024]), num_classes=rng.choice([10_000, 100_000]))
    elif axis == "images":
        changes.update(width=rng.choice([4, 16, 64]), image_size=4096)
    elif axis == "depth" and name == "resnet8":
        changes["name"] = "resnet20"
    return declaring(bases[name], changes, half=rng.random() < 0.5, fill=rng.random() < 0.5)


def measured(load: Callable[[], object]) -> tuple[BaseException | None, float, float]:
    """(what ``load`` raised, its seconds, MB it took the resident memory above where it was, sampled while it
    ran: what it frees before returning counts too)."""
    start, raised = time.perf_counter(), None
    with peak_rss_above_idle() as extra_mb:
        try:
            load()
        except Exception as e:  # noqa: BLE001 - what it raised is the measurement
            raised = e
        seconds = time.perf_counter() - start
    return raised, seconds, extra_mb[0]


def packed_crafted(count: int, seed: int) -> dict[str, Any]:
    """Load ``count`` crafted packed files (``_crafted``) in this process: each must be refused with
    PackedFormatError quickly and before the loader allocates what its header declares."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    bases = {name: pack_checkpoint(build_run_model(RunSettings.defaults(width=4, model=name, dataset=dataset)))
             .to_bytes() for name, dataset in (("cnn", "fashion-mnist"), ("resnet8", "cifar10"), ("resnet20", "cifar10"))}
    refused, max_s, max_mb, examples = 0, 0.0, 0.0, []
    for _ in range(count):
        crafted = _crafted(rng, bases)
        raised, seconds, mb = measured(lambda: PackedModel.from_bytes(crafted, "crafted"))
        refused += isinstance(raised, PackedFormatError)
        if not isinstance(raised, PackedFormatError):
            examples.append("loaded" if raised is None else f"{type(raised).__name__}: {raised}"[:200])
        max_s, max_mb = max(max_s, seconds), max(max_mb, mb)
    return {"tried": count, "refused": refused, "max_extra_mb": round(max_mb, 1), "max_s": round(max_s, 4),
            "examples": examples[:5]}


# -- control-plane requests ----------------------------------------------------------------------------------------


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
    server = serve(registry, "127.0.0.1", port, FLEET, lambda density, half: payload, max_workers=4)
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
    payload = _packed_model(seed)
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
    (``count`` calls) and a TLS SuperLink with SuperNode authentication (``superlink_tries`` SuperNodes)."""
    parts = {"control-plane": control_plane_strangers(count, seed), "predict": predict_strangers(count, seed),
             "superlink": unregistered_supernodes(superlink_tries)}
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
        served = ServedModel(PackedModel.from_bytes(_packed_model(seed)), 1.0)
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
        server, address = _control_plane(registry, _packed_model(seed))
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


# -- poisoned replies --------------------------------------------------------------------------------------------

Tensors = dict[str, torch.Tensor]
Reply = Callable[[Tensors, Tensors], tuple[Tensors | None, object]]  # (sent, honest reply) -> what a device replies
REPLY_COUNTS = {"1": 0, "2": 1, "3+": 3}  # a round's replies: how many honest ones beside the poisoned one


def _scaled(factor: float, var: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
            mean: Callable[[torch.Tensor], torch.Tensor] = lambda m: m) -> Reply:
    """The honest update times ``factor`` on the learned tensors, then BN statistics changed by ``var``, ``mean``."""
    def reply(sent: Tensors, honest: Tensors) -> tuple[Tensors, object]:
        change = {"running_var": var, "running_mean": mean}
        return {k: change[k.rpartition(".")[2]](v) if k.endswith(STATISTICS)
                else sent[k] + factor * (v - sent[k]) if v.is_floating_point() else v
                for k, v in honest.items()}, 100
    return reply


def _poisons() -> dict[str, Reply]:
    """Every kind of bad reply a device can send: (tensors or None for no arrays, num-examples). Malformed ones,
    and well-formed ones no honest training makes: scaled, reversed, BN statistics out of range."""
    def first(t: dict) -> str:
        return next(k for k in t if k.endswith(".values"))

    def changed(change: Callable[[torch.Tensor], torch.Tensor]) -> Reply:
        return lambda _, t: ({**t, first(t): change(t[first(t)].clone())}, 100)

    return {
        "nan": changed(lambda v: v.index_fill_(0, torch.tensor([0]), float("nan"))),
        "inf": changed(lambda v: v.index_fill_(0, torch.tensor([0]), float("inf"))),
        "huge": changed(lambda v: v * 1e30),
        "short": changed(lambda v: v[:-1]),
        "long": changed(lambda v: torch.cat([v, v[:1]])),
        "float64": changed(lambda v: v.double()),
        "reshaped": changed(lambda v: v.reshape(1, -1)),
        "missing tensor": lambda _, t: ({k: v for k, v in t.items() if k != first(t)}, 100),
        "extra tensor": lambda _, t: ({**t, "evil": torch.zeros(3)}, 100),
        "no arrays": lambda _, t: (None, 100),
        "examples 1e12": lambda _, t: (t, 10**12),
        "examples 0": lambda _, t: (t, 0),
        "examples -1": lambda _, t: (t, -1),
        "examples nan": lambda _, t: (t, float("nan")),
        "examples missing": lambda _, t: (t, None),
        "update ×1000": _scaled(1000),
        "update ×10, running_var ×1e6": _scaled(10, var=lambda v: v * 1e6),
        "negative running_var": _scaled(1, var=lambda v: -v),
        "running_mean +1e6": _scaled(1, mean=lambda m: m + 1e6),
        "update reversed ×100": _scaled(-100),
    }


def _through_strategy(rounds: list[dict[str, str | None]], seed: int) -> Counter[str]:
    """Each round's devices (name: kind of poison, None for an honest one) reply through the real strategy, at the
    sparsest tier: how many poisoned and honest replies it aggregated, rounds rolled back, crashes (an exception
    out of the aggregation, a model not finite), rounds whose model was implausible against the last. An honest
    reply moves every value it was sent by 0.01, up in odd rounds and down in even ones: the model keeps its size,
    as weight decay keeps a trained one's, so an update is judged against a model of the same size all along."""
    torch.manual_seed(seed)
    kinds = _poisons()
    counts: Counter[str] = Counter()
    with task_identity(), tempfile.TemporaryDirectory() as tmp, \
            Registry(f"sqlite:///{tmp}/registry.sqlite3") as registry:  # a ServerApp's message identity
        model = build_run_model(RunSettings.defaults(width=4))
        data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
        strategy = DressStrategy(model, registry, torch.utils.data.DataLoader(data, batch_size=16), fraction=1.0,
                                 min_devices=1, seed=seed, stale_after=timedelta(seconds=30), max_examples=300)
        for round_number, devices in enumerate(rounds, 1):
            for name in devices:
                registry.register_device(name, "pi4", CALIBRATION)
            infos = {d.name: d for d in registry.list_devices()}
            strategy.stats[round_number] = RoundStats(round_number)
            nodes = {1000 * round_number + j: name for j, name in enumerate(devices)}
            strategy.membership.node_devices.update(nodes)
            sent = strategy.messages_for(round_number, [(node, infos[name], 0.1) for node, name in nodes.items()],
                                         train_config(RunSettings.defaults()))
            replies = []
            step = 0.01 if round_number % 2 else -0.01
            for message in sent:
                node = message.metadata.dst_node_id
                expected = strategy.sent[node].expected.tensors
                honest = {k: v + step if v.is_floating_point() else v for k, v in expected.items()}
                kind = devices[nodes[node]]
                tensors, examples = (honest, 100) if kind is None else kinds[kind](expected, honest)
                metrics: dict[str, Any] = {"compute-s": 0.1}
                if examples is not None:
                    metrics["num-examples"] = examples
                content: dict[str, Any] = {"metrics": MetricRecord(metrics)}
                if tensors is not None:
                    content["arrays"] = ArrayRecord(torch_state_dict=tensors)
                TaskIdentity.node_id = node
                replies.append(Message(RecordDict(content), reply_to=message))
            TaskIdentity.node_id = 1
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                strategy.aggregate_train(round_number, replies)
            except Exception:  # noqa: BLE001 - the ServerApp would have ended
                counts["crashes"] += 1
            stats = strategy.stats[round_number]
            for name, _ in stats.participants.values():
                counts["honest" if devices[name] is None else "aggregated"] += 1
            counts["rolled back"] += stats.withheld is not None
            if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
                counts["crashes"] += 1
            counts["implausible"] += implausible(before, model.state_dict()) is not None
    return counts


def _kinds(count: int) -> list[str]:
    """``count`` kinds of poison, every kind in turn."""
    kinds = list(_poisons())
    return [kinds[i % len(kinds)] for i in range(count)]


def poisoned(count: int, seed: int) -> dict[str, Any]:
    """``count`` poisoned replies (every kind in turn), five with three honest ones a round, through the real
    strategy."""
    names = _kinds(count)
    rounds = [{f"honest-{j}": None for j in range(3)} | {f"poisoned-{i + k}": n for k, n in enumerate(names[i:i + 5])}
              for i in range(0, count, 5)]
    counts = _through_strategy(rounds, seed)
    return {"tried": count, "aggregated": counts["aggregated"], "crashes": counts["crashes"],
            "kinds": sorted(_poisons())}


def poisoned_by_replies(count: int, seed: int) -> dict[str, Any]:
    """``count`` poisoned replies (every kind in turn) in rounds of each size, one poisoned reply a round: alone,
    beside one honest reply (too few for a median) and beside three; and whether training went on — the honest
    replies aggregated, every round's model finite with BN statistics in range (plausible against the last)."""
    result: dict[str, Any] = {}
    plausible = True
    for size, honest in REPLY_COUNTS.items():
        rounds = [{f"honest-{j}": None for j in range(honest)} | {f"poisoned-{i}": kind}
                  for i, kind in enumerate(_kinds(count))]
        counts = _through_strategy(rounds, seed)
        result[size] = {"tried": count, "aggregated": counts["aggregated"], "honest_tried": honest * count,
                        "honest_aggregated": counts["honest"], "rolled_back": counts["rolled back"],
                        "crashes": counts["crashes"]}
        plausible = plausible and not counts["implausible"] and not counts["crashes"]
    return {**result, "model_plausible": plausible}


def report(result: dict[str, Any]) -> str:
    """reliability.md: a row per probe measured, then what the refusals were and the Byzantine runs."""
    rows = []
    if "poisoned" in result:
        rows.append({"probe": "poisoned replies", "tried": result["poisoned"]["tried"],
                     "aggregated": result["poisoned"]["aggregated"], "crashes": result["poisoned"]["crashes"]})
    if "poisoned_by_replies" in result:
        rows += [{"probe": f"poisoned replies, one a round of {size} ({REPLY_COUNTS[size]} honest)",
                  "tried": part["tried"], "aggregated": part["aggregated"], "crashes": part["crashes"]}
                 for size, part in result["poisoned_by_replies"].items() if size in REPLY_COUNTS]
    if "fuzz" in result:
        rows += [{"probe": "fuzzed packed files", "tried": result["fuzz"]["packed"]["tried"], "aggregated": "—",
                  "crashes": result["fuzz"]["packed"]["crashes"]},
                 {"probe": "fuzzed control-plane requests", "tried": result["fuzz"]["grpc"]["tried"],
                  "aggregated": "—", "crashes": result["fuzz"]["grpc"]["crashes"]}]
    if "packed_crafted" in result:
        c = result["packed_crafted"]
        rows.append({"probe": f"crafted packed files: consistent headers declaring huge models (slowest "
                              f"{c['max_s']:.3f} s, at most {c['max_extra_mb']:.1f} MB resident)",
                     "tried": c["tried"], "aggregated": "—", "crashes": c["tried"] - c["refused"]})
    if "strangers" in result:
        rows += [{"probe": f"strangers: {where}", "tried": part["tried"], "aggregated": "—",
                  "crashes": part["tried"] - part["refused"]} for where, part in result["strangers"]["where"].items()]
    if "superlink" in result and "skipped" not in result["superlink"]:
        s = result["superlink"]
        rows.append({"probe": "strangers at the public SuperLink address, another host (flwr CLI, every route, fuzz)",
                     "tried": s["tried"], "aggregated": "—",
                     "crashes": f"{s['tried'] - s['refused']}; coordinator alive: {s['coordinator_alive']}"})
    if "faults" in result:
        f = result["faults"]
        rows.append({"probe": f"kill -9 during rounds ({f['agents']} agents, coordinator; {f['rounds']} rounds)",
                     "tried": f["kills"], "aggregated": "—", "crashes": f"run completed: {bool(f['runs_completed'])}, "
                     f"lost {f['lost']}, orphans {f['orphans']}, mid-round kills {f.get('kills_mid_round', '—')}, "
                     f"restart tracebacks {f.get('restart_tracebacks', '—')}"})
    text = (f"# Reliability: strangers' bytes and poisoned devices\n\n`{result['command']}`\n\n"
            + markdown_table(rows, ["probe", "tried", "aggregated", "crashes"])
            + "\nFor strangers, *crashes* counts those not refused.")
    if "fuzz" in result:
        text += (" Control-plane answers to the fuzzed requests (half of them carrying a real device's credential): "
                 f"{result['fuzz']['grpc']['codes']}.")
    if "strangers" in result:
        where = result["strangers"]["where"]
        text += (f" To the strangers ({', '.join(STRANGERS)}): {where['control-plane']['codes']}. Predict on mutual "
                 f"TLS ({', '.join(PREDICT_STRANGERS)}): {where['predict']['codes']}. SuperLink with SuperNode "
                 "authentication: SuperNodes with an unregistered key and with none.")
    if "poisoned_by_replies" in result:
        by = result["poisoned_by_replies"]
        text += (" Beside the poisoned replies, honest ones aggregated: "
                 + ", ".join(f"{by[size]['honest_aggregated']} of {by[size]['honest_tried']} (rounds of {size})"
                             for size in REPLY_COUNTS)
                 + f"; rounds rolled back: {sum(by[size]['rolled_back'] for size in REPLY_COUNTS)}; every round's "
                 f"model finite, with BN statistics in range: {by['model_plausible']}.")
    text += "\n"
    if "byzantine" in result:
        b = result["byzantine"]
        tiers = list(b["clean_accuracy"])
        named = (("clean, mean", b["clean_accuracy"]), (f"clean, {b['aggregation']}", b.get("clean_robust_accuracy")),
                 (f"{b['liars']} liars, mean (no defence)", b["undefended_accuracy"]),
                 (f"{b['liars']} liars, {b['aggregation']}", b["accuracy"]))
        runs = [{"run": run, **{f"d={t}": accuracy[t] for t in tiers}} for run, accuracy in named if accuracy]
        gap = "—" if b["worst_gap"] is None else f"{b['worst_gap']:.2f} pt"
        text += (f"\n## Byzantine devices\n\n{b['liars']} of {b['devices']} devices ({b['fraction']:.0%}) reply "
                 f"{b['attack']} of their honest update; {b['partition']}, {b['rounds']} rounds, accuracy per tier = "
                 f"mean of the last {b['last']} rounds, mean over seeds {', '.join(map(str, b['seeds']))}. Worst "
                 f"tier's gap between the clean run (mean) and the attacked one with {b['aggregation']}: {gap}.\n\n"
                 + markdown_table(runs, ["run", *(f"d={t}" for t in tiers)]))
    return text


PARTS = ("poisoned", "poisoned_by_replies", "strangers", "superlink", "faults", "fuzz", "packed_crafted", "byzantine")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packed", type=int, default=1000, help="fuzzed packed files")
    p.add_argument("--crafted", type=int, default=200, help="crafted packed files (consistent header, huge model)")
    p.add_argument("--grpc", type=int, default=1000, help="fuzzed control-plane requests")
    p.add_argument("--poisoned", type=int, default=60, help="poisoned replies")
    p.add_argument("--poisoned-by-replies", type=int, default=60,
                   help="poisoned replies in rounds of each size (1, 2, 3+ replies), one a round")
    p.add_argument("--strangers", type=int, default=210, help="strangers' calls to the control plane and Predict")
    p.add_argument("--superlink", type=int, default=200, help="fuzzed Fleet API requests among the strangers' probes "
                   "of a TLS coordinator's public SuperLink address from another host (benchmarks/superlink_strangers.py)")
    p.add_argument("--faults", type=int, default=20, help="kill -9 of agents and the coordinator during rounds "
                   "(benchmarks/faults.py); 0 = skip")
    p.add_argument("--byzantine", type=int, default=30, help="rounds of each run with and without Byzantine devices "
                   "(benchmarks/byzantine.py: 100 devices, each of --byzantine-runs per seed); 0 = skip")
    p.add_argument("--byzantine-seeds", default="0,1")
    p.add_argument("--byzantine-runs", default=",".join(BYZANTINE_RUNS),
                   help="which runs per seed (benchmarks/byzantine.py RUNS); the others are kept from --out")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to measure, from {', '.join(PARTS)}; the others are kept from --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = p.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(only) - set(PARTS)):
        raise SystemExit(f"--only: unknown part(s) {unknown}; expected some of {', '.join(PARTS)}")
    byzantine_runs = tuple(r.strip() for r in args.byzantine_runs.split(",") if r.strip())
    if unknown := sorted(set(byzantine_runs) - set(BYZANTINE_RUNS)):
        raise SystemExit(f"--byzantine-runs: unknown run(s) {unknown}; expected some of {', '.join(BYZANTINE_RUNS)}")
    try:
        byzantine_seeds = tuple(int(s) for s in args.byzantine_seeds.split(","))
    except ValueError:
        raise SystemExit(f"--byzantine-seeds: comma-separated integers expected, got {args.byzantine_seeds!r}") from None
    kept = json.loads(args.out.read_text()) if set(only) != set(PARTS) and args.out.is_file() else {}
    measure: dict[str, Callable[[], Any]] = {
        "poisoned": lambda: poisoned(args.poisoned, args.seed),
        "poisoned_by_replies": lambda: poisoned_by_replies(args.poisoned_by_replies, args.seed),
        "strangers": lambda: strangers(args.strangers, args.seed),
        "superlink": lambda: superlink_strangers(args.superlink, args.seed),
        "faults": lambda: run_faults(args.faults, seed=args.seed) if args.faults else None,
        "fuzz": lambda: {"packed": fuzz_packed(args.packed, args.seed), "grpc": fuzz_grpc(args.grpc, args.seed)},
        "packed_crafted": lambda: packed_crafted(args.crafted, args.seed),
        "byzantine": lambda: run_byzantine(seeds=byzantine_seeds, rounds=args.byzantine, runs=byzantine_runs,
                                           kept=kept.get("byzantine", {}).get("runs")) if args.byzantine else None,
    }
    result = {"command": " && ".join(dict.fromkeys([*filter(None, kept.get("command", "").split(" && ")), command()])),
              "machine": machine(), "seed": args.seed, **{k: kept[k] for k in PARTS if k in kept and k not in only}}
    for part in only:
        if (value := measure[part]()) is not None:
            result[part] = value
    write_json(args.out, result)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(report(result)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
