"""A fleet's certificates: `certs init` makes them, plaintext is refused beyond loopback."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from contracts.settings import RunSettings
from contracts.tls import CertificateError, FleetCertificates, init_certificates, is_loopback
from coordinator.launcher import Coordinator, Endpoints


def test_init_makes_a_ca_and_a_server_certificate_for_the_hosts(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs", ["coord.lan", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coord.lan", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")} <= set(
        names.get_values_for_type(x509.IPAddress))
    for key in (certs.server_key, certs.directory / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certs.server_credentials()  # grpc accepts the pair


def test_an_existing_fleet_ca_is_never_replaced(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path, [])
    before = certs.ca.read_bytes()
    with pytest.raises(CertificateError, match="every device of that fleet trusts it"):
        init_certificates(tmp_path, [])
    assert certs.ca.read_bytes() == before


def test_plaintext_beyond_loopback_and_missing_files_are_refused(tmp_path: Path) -> None:
    settings = RunSettings.defaults(state_dir=str(tmp_path / "state"))
    with pytest.raises(CertificateError, match="plaintext is for loopback only"):
        Coordinator(settings, Endpoints("0.0.0.0"))
    with pytest.raises(CertificateError, match="lacks ca.pem, server.pem, server.key"):
        Coordinator(settings, Endpoints("0.0.0.0"), certs=FleetCertificates(tmp_path / "none"))
    Coordinator(settings, Endpoints("127.0.0.1"))  # loopback may speak plaintext
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")
