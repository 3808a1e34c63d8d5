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
    write_private(directory / CA_KEY, _key_pem(ca_key))
    atomic_write(certs.ca, lambda tmp: tmp.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM)))
    _issue(ca_key, ca_cert, hosts[0] if hosts else "localhost", hosts, False, days, certs.server_cert,
           certs.server_key)
    return certs


def issue_certificate(directory: Path, name: str, hosts: list[str], client: bool,
                      days: int = VALID_DAYS) -> tuple[Path, Path]:
    """A certificate the fleet CA in ``directory`` signs: ``<name>.pem`` and ``<name>.key`` (0600) beside it.

    A server certificate (an agent's Predict listener) names ``hosts`` (loopback always included); a client one
    (``client``) is a caller's credential for Predict and Status. CertificateError without the CA's key."""
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if not (ca_cert_path.is_file() and ca_key_path.is_file()):
        raise CertificateError(f"{directory} lacks {CA_CERT} and {CA_KEY}: issue certificates where "
                               "`dress-fleet certs init` made the fleet's CA")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if name in ("ca", "server") or cert_path.exists():
        raise CertificateError(f"{cert_path} exists already: choose another name")
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{ca_key_path} is not the EC key `certs init` makes")
    _issue(ca_key, ca_cert, name, hosts, client, days, cert_path, key_path)
    return cert_path, key_path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, hosts: list[str],
           client: bool, days: int, cert_path: Path, key_path: Path) -> None:
    """Sign a server certificate for ``hosts`` (+ loopback) or a client certificate, and write it and its key."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                              else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if not client:
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys([*hosts, *LOOPBACK]):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(key_path, _key_pem(key))
    atomic_write(cert_path, lambda tmp: tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM)))


def mutual_server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS that also demands a client certificate the fleet CA signed: Predict beyond loopback."""
    _require((ca, cert, key), "`dress-fleet certs issue NAME` makes a certificate")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())], root_certificates=ca.read_bytes(),
                                       require_client_auth=True)


def client_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """A caller of an agent's Predict: verifies the agent against the fleet CA and proves itself with its own."""
    _require((ca, cert, key), "`dress-fleet certs issue NAME --client` makes one")
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
                                        certificate_chain=cert.read_bytes())


def _require(paths: tuple[Path, ...], hint: str) -> None:
    for path in paths:
        if not path.is_file():
            raise CertificateError(f"{path} does not exist ({hint})")
