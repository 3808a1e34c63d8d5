"""Who is calling the control plane: one-time enrollment tokens, per-device credentials, and how they travel.

An operator enrolls a device by name (``dress-fleet devices enroll NAME``) and hands its one-time token to the
device; the device's first Register trades the token for a credential that only that device holds and that
the registry stores only as a SHA-256 digest. Both are bearer secrets with 256 random bits, sent as gRPC
metadata (``authorization: Bearer ...``) on every call, so they work on TLS and on loopback alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.certificates import write_private

METADATA_KEY = "authorization"
SCHEME = "Bearer "
TOKEN_PREFIX, CREDENTIAL_PREFIX = "dfe_", "dfd_"  # enrollment token, device credential: telling them apart in logs
OPERATOR_PREFIX = "dfo_"  # an operator's credential: the dashboard and the metrics, never the control plane
CREDENTIAL_FILE = "credential.json"
SUPERNODE_KEY_FILE = "supernode.key"  # the device's SuperNode key pair (OpenSSH), made once per --state-dir
MAX_PUBLIC_KEY_LENGTH = 1024
MAX_SECRET_LENGTH = 128


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the registry stores and looks up: a leaked database reveals no usable secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer(secret: str) -> tuple[tuple[str, str]]:
    """Per-call gRPC metadata carrying ``secret``."""
    return ((METADATA_KEY, SCHEME + secret),)


def presented_secret(metadata: Any) -> str | None:
    """The bearer secret of a call's invocation metadata, or None when there is none or it is malformed."""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and value.startswith(SCHEME):
            secret = value[len(SCHEME):]
            if 0 < len(secret) <= MAX_SECRET_LENGTH and secret.isascii() and secret.isprintable():
                return secret
    return None


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the current secret to every call: the agent swaps its token for its credential mid-life."""

    def __init__(self, secret: Callable[[], str | None]) -> None:
        self._secret = secret

    def _with_secret(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        secret = self._secret()
        if secret is None:
            return details
        metadata = [m for m in (details.metadata or ()) if m[0] != METADATA_KEY] + list(bearer(secret))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_secret(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_secret(details), request)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def with_bearer(channel: grpc.Channel, secret: Callable[[], str | None]) -> grpc.Channel:
    """``channel`` with ``secret()`` attached to every call made through it."""
    return grpc.intercept_channel(channel, _BearerInterceptor(secret))


def supernode_key(state_dir: Path, renew: bool = False) -> tuple[Path, str]:
    """The device's SuperNode private key file and its public key (one OpenSSH line), made on first use, and
    made anew with ``renew`` (the SuperLink retired the old one: it never registers a removed key again).

    The coordinator registers the public key with its SuperLink when the device enrolls (Flower's SuperNode
    authentication): the private key never leaves the device, and only a registered key's holder can connect."""
    path = state_dir / SUPERNODE_KEY_FILE
    if renew or not path.is_file():
        key = ec.generate_private_key(ec.SECP384R1())
        state_dir.mkdir(parents=True, exist_ok=True)
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    try:
        private = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a SuperNode key ({e}); delete it and enroll again with --token") from e
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode()


def check_public_key(text: str) -> str:
    """An OpenSSH EC public key on a NIST curve (what Flower's SuperLink registers), or ValueError saying why."""
    if not 0 < len(text) <= MAX_PUBLIC_KEY_LENGTH:
        raise ValueError(f"a SuperNode public key is one OpenSSH line of at most {MAX_PUBLIC_KEY_LENGTH} characters")
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnicodeError) as e:
        raise ValueError(f"the SuperNode public key is not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                 "secp521r1"):
        raise ValueError("the SuperNode public key must be an EC key on a NIST curve (P-256, P-384 or P-521)")
    return text


@dataclass(frozen=True)
class StoredCredential:
    """What a device keeps after enrolling: who it is to the coordinator and the secret that proves it."""

    name: str
    device_id: int
    credential: str
    coordinator: str

    def save(self, state_dir: Path) -> Path:
        """Written whole (temp file and rename), readable by its owner only."""
        path = state_dir / CREDENTIAL_FILE
        state_dir.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(asdict(self), indent=2).encode())
        return path

    @classmethod
    def load(cls, state_dir: Path) -> StoredCredential | None:
        """The stored credential, None when the device never enrolled; ValueError when the file is damaged."""
        path = state_dir / CREDENTIAL_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            stored = cls(str(data["name"]), int(data["device_id"]), str(data["credential"]), str(data["coordinator"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a device credential ({e}); delete it and enroll again with --token") from e
        if not stored.credential.startswith(CREDENTIAL_PREFIX):
            raise ValueError(f"{path} holds no device credential; delete it and enroll again with --token")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            path.chmod(0o600)  # a secret others can read is not one; tighten rather than refuse
        return stored
