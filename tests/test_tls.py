"""A fleet's certificates: `certs init` makes them, plaintext is refused beyond loopback; the coordinator's secrets
stay its own."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import grpc
import pytest
from conftest import architecture
from cryptography import x509
from sqlalchemy.engine import make_url

from agent.calibration import initial_model
from agent.lifecycle import Agent, AgentConfig, AgentError
from agent.served_model import ServedModel
from agent.serving import AgentIdentity, AgentServer, serve
from contracts.profiles import get_profile
from contracts.settings import RunSettings
from coordinator.launcher import Coordinator, Endpoints
from coordinator.registry.engine import URL_FILENAME, default_url
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from runtime.certificates import (
    CertificateError,
    FleetCertificates,
    client_credentials,
    init_certificates,
    is_loopback,
    issue_certificate,
    mutual_server_credentials,
)
from runtime.processes import flwr, pick_port


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


def _predict_server(tmp_path: Path, credentials) -> tuple[AgentServer, ServedModel]:
    served = ServedModel(initial_model(architecture("cnn", "1,0.5", "fashion-mnist", 4)), 1.0)
    return serve(served, AgentIdentity("pi-kitchen", 7, "pi4"), "127.0.0.1", 0, credentials=credentials), served


def _status(channel: grpc.Channel) -> agent_pb.StatusResponse:
    return agent_grpc.AgentStub(channel).Status(agent_pb.StatusRequest(), timeout=5)


def test_predict_over_mutual_tls_answers_only_the_fleets_clients(tmp_path: Path) -> None:
    fleet, other = tmp_path / "fleet", tmp_path / "other"
    init_certificates(fleet, [])
    init_certificates(other, [])
    cert, key = issue_certificate(fleet, "pi-kitchen", ["pi.local"], client=False)
    app_cert, app_key = issue_certificate(fleet, "app", [], client=True)
    stranger_cert, stranger_key = issue_certificate(other, "app", [], client=True)
    assert (key.stat().st_mode & 0o777) == 0o600
    issued = x509.load_pem_x509_certificate(app_cert.read_bytes())
    assert issued.issuer == x509.load_pem_x509_certificate((fleet / "ca.pem").read_bytes()).subject
    server, _ = _predict_server(tmp_path, mutual_server_credentials(fleet / "ca.pem", cert, key))
    address = f"127.0.0.1:{server.port}"
    try:
        with grpc.secure_channel(address, client_credentials(fleet / "ca.pem", app_cert, app_key)) as channel:
            assert _status(channel).name == "pi-kitchen"
        strangers = {
            "plaintext": grpc.insecure_channel(address),
            "no client certificate": grpc.secure_channel(address, grpc.ssl_channel_credentials(
                (fleet / "ca.pem").read_bytes())),
            "another CA's client": grpc.secure_channel(address, grpc.ssl_channel_credentials(
                (fleet / "ca.pem").read_bytes(), stranger_key.read_bytes(), stranger_cert.read_bytes())),
            "a server certificate as client": grpc.secure_channel(address, grpc.ssl_channel_credentials(
                (fleet / "ca.pem").read_bytes(), key.read_bytes(), cert.read_bytes())),
        }
        for what, channel in strangers.items():
            with channel, pytest.raises(grpc.RpcError) as caught:
                _status(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, what
    finally:
        server.stop(grace=0)


def test_issuing_needs_the_fleet_ca_and_a_new_name(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="lacks ca.pem and ca.key"):
        issue_certificate(tmp_path, "pi", [], client=False)
    init_certificates(tmp_path, [])
    issue_certificate(tmp_path, "pi", [], client=False)
    for name in ("pi", "server", "ca"):
        with pytest.raises(CertificateError, match="exists already"):
            issue_certificate(tmp_path, name, [], client=True)


def test_an_agent_serving_beyond_loopback_without_certificates_is_refused(tmp_path: Path) -> None:
    base = {"name": None, "profile": get_profile("pi4"), "coordinator": "127.0.0.1:1", "superlink": "127.0.0.1:2",
            "budget": None, "state_dir": tmp_path}
    with pytest.raises(AgentError, match="Predict on 0.0.0.0 needs TLS with client certificates"):
        Agent(AgentConfig(**base, serve_host="0.0.0.0")).predict_credentials()
    with pytest.raises(AgentError, match="needs all of --predict-cert, --predict-key and --ca"):
        Agent(AgentConfig(**base, serve_host="0.0.0.0", predict_cert=tmp_path / "x.pem")).predict_credentials()
    assert Agent(AgentConfig(**base)).predict_credentials() is None  # loopback: plaintext is fine


def test_the_database_password_stays_out_of_the_run_and_the_state_is_private(pg_url: str, tmp_path: Path) -> None:
    """A run's config is what `flwr ls` shows and the SuperLink stores: the registry URL, password and all, stays
    in a 0600 file of the 0700 state directory, where the ServerApp finds it."""
    url = make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)  # trust auth accepts it
    settings = RunSettings.defaults(state_dir=str(tmp_path / "state"), db_url=url, wait_for_nodes=1)
    c = Coordinator(settings, Endpoints("127.0.0.1", pick_port(), pick_port()))
    try:
        c.start()
        run_id = c.submit()
        listed = json.dumps(flwr(c.state_dir, "ls", "local", "--run-id", str(run_id)))
        assert str(run_id) in listed and "s3cret-pw" not in listed
        assert b"s3cret-pw" not in (c.state_dir / "superlink.db").read_bytes()
        assert stat.S_IMODE(c.state_dir.stat().st_mode) == 0o700
        saved = c.state_dir / URL_FILENAME
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and default_url(c.state_dir) == url
    finally:
        c.stop()
    assert "db-url" not in settings.to_run_config() and RunSettings.from_run_config(settings.to_run_config()) == \
        settings.replace(db_url="")
