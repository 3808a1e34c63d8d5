"""A stranger at a coordinator's public SuperLink address, run on a host of its own (benchmarks/superlink_strangers.py
starts it inside a network namespace): holding only the fleet's public ca.pem, or nothing, it tries what Flower's
`flwr` CLI offers (run, stop, ls, supernode register/unregister), raw HTTP on every route prefix, a SuperNode
self-registration signed with its own key, and fuzzed Fleet API requests. Prints one JSON line: every probe and
the HTTP status or CLI outcome it got.

    python stranger_probe.py --address 10.231.0.1:9092 --ca ca.pem --app APP_DIR --fuzz 200 --seed 0
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fleet_pb2 import ActivateNodeRequest, PullMessagesRequest, RegisterNodeFleetRequest

ROUTES = {
    "/v1/control/": ["start-run", "stop-run", "list-runs", "register-supernode", "unregister-supernode", "list-nodes",
                     "stream-logs", "get-login-details", "pull-artifacts"],
    "/v1/runtime/": ["pull-messages", "push-messages", "get-run", "get-fab", "acquire-task", "push-object"],
    "/v1/serverappio/": ["get-nodes", "push-messages"],
    "/v1/fleet/": ["register-node", "activate-node", "pull-messages", "push-messages", "get-run", "get-fab",
                   "pull-object", "push-object", "send-node-heartbeat", "unregister-node", "deactivate-node"],
    "/": ["docs", "openapi.json", "redoc", "", "health/../v1/control/list-runs", "v1/fleet/../control/list-runs"],
}


def _http(url: str, method: str, body: bytes | None, headers: dict[str, str], context: ssl.SSLContext) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0  # no HTTP answer at all (TLS refused, connection reset)


def _signed(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """Flower's SuperNode authentication headers, signed with a key nobody registered."""
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    timestamp = datetime.now(UTC).isoformat()
    signature = key.sign(timestamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return {"flwr-public-key": base64.b64encode(public).decode(), "flwr-timestamp": timestamp,
            "flwr-signature": base64.b64encode(signature).decode()}


def cli_probes(address: str, ca: Path, app: Path) -> list[dict]:
    """The `flwr` CLI aimed at the public address, verifying it with the fleet CA and with nothing."""
    out = []
    key = ec.generate_private_key(ec.SECP384R1())
    with tempfile.TemporaryDirectory() as tmp:
        pub = Path(tmp) / "own.pub"
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH))
        (Path(tmp) / "config.toml").write_text(
            f'[superlink.ca]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
            f'[superlink.plain]\naddress = "{address}"\ninsecure = true\n')
        env = {**os.environ, "FLWR_HOME": tmp, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        flwr = str(Path(sys.executable).parent / "flwr")
        for connection in ("ca", "plain"):
            for args in (["run", str(app), connection], ["stop", "1", connection], ["ls", connection],
                         ["supernode", "ls", connection], ["supernode", "register", str(pub), connection],
                         ["supernode", "unregister", "1", connection]):
                done = subprocess.run([flwr, *args, "--format", "json"], env=env, capture_output=True, text=True,
                                      timeout=120)
                try:
                    success = bool(json.loads(done.stdout).get("success"))
                except json.JSONDecodeError:
                    success = done.returncode == 0
                out.append({"probe": f"flwr {' '.join(args)}", "refused": not success})
    return out


def http_probes(base: str, ca: Path) -> list[dict]:
    """Every route prefix, GET and POST, verifying the server with the CA and without verifying at all."""
    out = []
    verified = ssl.create_default_context(cafile=str(ca))
    unverified = ssl._create_unverified_context()  # noqa: S323 - what `curl -k` does
    for prefix, names in ROUTES.items():
        for name in names:
            for method in ("GET", "POST"):
                for label, context in (("ca", verified), ("no-ca", unverified)):
                    status = _http(base + prefix + name, method, b"" if method == "POST" else None,
                                   {"Content-Type": "application/protobuf"}, context)
                    out.append({"probe": f"{method} {prefix}{name} ({label})", "status": status,
                                "refused": not 200 <= status < 300})
    key = ec.generate_private_key(ec.SECP384R1())
    own = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, message in (("register-node", RegisterNodeFleetRequest(public_key=own)),
                          ("activate-node", ActivateNodeRequest(public_key=own, heartbeat_interval=30))):
        status = _http(f"{base}/v1/fleet/{name}", "POST", message.SerializeToString(),
                       {"Content-Type": "application/protobuf", **_signed(key)}, verified)
        out.append({"probe": f"POST /v1/fleet/{name} signed with an unregistered key", "status": status,
                    "refused": not 200 <= status < 300})
    return out


def fuzz_probes(base: str, ca: Path, count: int, seed: int) -> list[dict]:
    """``count`` spoilt Fleet API requests: random paths and bodies, real message types with random node ids,
    random or foreign authentication headers."""
    rng = random.Random(seed)
    context = ssl.create_default_context(cafile=str(ca))
    key = ec.generate_private_key(ec.SECP384R1())
    out = []
    for _ in range(count):
        name = rng.choice(ROUTES["/v1/fleet/"] + ["x" * rng.randint(1, 300), "%00", "..%2f..%2fcontrol%2flist-runs"])
        kind = rng.randrange(4)
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 4096))
        elif kind == 1:
            body = PullMessagesRequest(node=dict(node_id=rng.getrandbits(63))).SerializeToString()
        elif kind == 2:
            body = json.dumps({"node_id": rng.getrandbits(63)}).encode()
        else:
            body = rng.randbytes(rng.randint(0, 64)) * rng.randint(1, 2000)
        headers = {"Content-Type": rng.choice(["application/protobuf", "application/json", "text/plain", "x/y"])}
        if rng.random() < 0.5:
            headers.update(_signed(key))
        if rng.random() < 0.3:
            headers["flwr-signature"] = base64.b64encode(rng.randbytes(96)).decode()
        status = _http(f"{base}/v1/fleet/{name}", "POST", body, headers, context)
        out.append({"probe": f"fuzz POST /v1/fleet/{name[:40]}", "status": status,
                    "refused": not 200 <= status < 300})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--app", type=Path, required=True)
    p.add_argument("--fuzz", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    base = f"https://{args.address}"
    probes = (cli_probes(args.address, args.ca, args.app) + http_probes(base, args.ca)
              + fuzz_probes(base, args.ca, args.fuzz, args.seed))
    public = _http(f"{base}/health", "GET", None, {}, ssl.create_default_context(cafile=str(args.ca)))
    print(json.dumps({"probes": probes, "health": public}))


if __name__ == "__main__":
    main()
