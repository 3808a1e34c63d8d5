"""TLS for the fleet's listeners: a fleet CA, the coordinator's server certificate, and gRPC credentials.

``dress-fleet certs init`` makes a test fleet's files with ``cryptography``; an operator can bring their own
(the same four file names in one folder). The coordinator serves its control plane and Flower's SuperLink with
``server.pem``/``server.key``; devices verify both against ``ca.pem``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dress_model.checkpoint import atomic_write

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


class CertificateError(ValueError):
    """Certificate files are missing or unreadable; the message says which and how to make them."""


@dataclass(frozen=True)
class FleetCertificates:
    """A folder holding the fleet CA (ca.pem, ca.key) and the coordinator's certificate (server.pem, server.key)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    def require_server(self) -> FleetCertificates:
        """What a coordinator needs; CertificateError naming the missing files otherwise."""
        missing = [p.name for p in (self.ca, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise CertificateError(f"{self.directory} lacks {', '.join(missing)}: make a test fleet's with "
                                   f"`dress-fleet certs init --dir {self.directory}` or bring your own")
        return self

    def server_credentials(self) -> grpc.ServerCredentials:
        self.require_server()
        return grpc.ssl_server_credentials([(self.server_key.read_bytes(), self.server_cert.read_bytes())])


def channel_credentials(ca: Path) -> grpc.ChannelCredentials:
    """What a device connects with: the fleet CA it verifies the coordinator against."""
    if not ca.is_file():
        raise CertificateError(f"CA certificate {ca} does not exist: copy the fleet's ca.pem to the device")
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())


def https_context(ca: Path) -> ssl.SSLContext:
    """For the SuperLink's HTTPS health check."""
    return ssl.create_default_context(cafile=str(ca))


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only, at no moment otherwise, and whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def init_certificates(directory: Path, hosts: list[str], days: int = VALID_DAYS) -> FleetCertificates:
    """A new fleet CA and a server certificate for ``hosts`` (names or IPs; loopback always included).

    Refuses to replace an existing CA: every device trusts it. Keys are written 0600."""
    certs = FleetCertificates(directory)
    if certs.ca.exists():
        raise CertificateError(f"{certs.ca} exists: every device of that fleet trusts it; use another --dir")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dress-fleet CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    for path, key in ((directory / CA_KEY, ca_key), (certs.server_key, server_key)):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_private(path, pem)
    for path, cert in ((certs.ca, ca_cert), (certs.server_cert, server_cert)):
        atomic_write(path, lambda tmp, cert=cert: tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM)))
    return certs
