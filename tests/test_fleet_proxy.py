"""A TLS coordinator's SuperLink is reached only through nginx, which passes the Fleet API and health alone; only
the coordinator registers SuperNode keys, and a device whose key was removed gets a new one registered."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import DeviceStub

from contracts.credentials import supernode_key
from contracts.settings import RunSettings
from coordinator import fleet_proxy
from coordinator.fleet_proxy import ProxyUnavailableError
from coordinator.launcher import Coordinator, Endpoints
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from runtime.certificates import channel_credentials, init_certificates
from runtime.processes import flwr, pick_port, require_free_port, supernode_status, unregister_supernode

pytestmark = pytest.mark.skipif(not any(map(shutil.which, fleet_proxy.NGINX_CANDIDATES)),
                                reason="nginx is not installed (make setup installs it)")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("proxy")
    certs = init_certificates(root / "certs", [])
    settings = RunSettings.defaults(state_dir=str(root / "state"))
    c = Coordinator(settings, Endpoints("127.0.0.1", pick_port(), pick_port()), certs=certs)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _call(c: Coordinator, path: str, method: str, body: bytes | None = None) -> int:
    """The HTTP status a caller holding only the fleet's public ca.pem gets at the SuperLink's public address."""
    assert c.certs is not None
    request = urllib.request.Request(f"https://127.0.0.1:{c.endpoints.superlink_port}{path}", data=body,
                                     method=method, headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=c.certs.ca)) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("path", ["/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run",
                                  "/v1/control/register-supernode", "/v1/control/unregister-supernode",
                                  "/v1/runtime/pull-messages", "/docs", "/openapi.json", "/", "/v1/fleet/../control/list-runs"])
def test_the_public_address_answers_no_control_or_runtime_route(coordinator: Coordinator, path: str) -> None:
    for method in ("GET", "POST"):
        assert _call(coordinator, path, method, b"" if method == "POST" else None) == 404, (path, method)


def test_the_public_address_passes_health_and_the_fleet_api(coordinator: Coordinator) -> None:
    assert _call(coordinator, "/health", "GET") == 200
    assert _call(coordinator, "/health", "POST", b"") == 403
    assert _call(coordinator, "/v1/fleet/get-run", "GET") == 403  # SuperNodes only POST
    # reaches Flower, which refuses an unsigned or malformed request itself
    assert _call(coordinator, "/v1/fleet/get-run", "POST", b"\x08\x01") in (400, 401, 422)


def test_a_stranger_cannot_run_stop_or_list_through_the_public_address(coordinator: Coordinator,
                                                                     tmp_path: Path) -> None:
    """The `flwr` CLI aimed at the public address with the fleet CA (all a device holds) gets nowhere, while the
    operator's CLI on loopback works."""
    assert coordinator.certs is not None
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.public]\naddress = "127.0.0.1:{coordinator.endpoints.superlink_port}"'
                                      f'\nroot-certificates = "{coordinator.certs.ca}"\n')
    env = {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": str(Path(sys.executable).parent)}
    for args in (["ls", "public"], ["stop", "1", "public"], ["supernode", "ls", "public"]):
        done = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"],
                              env=env, capture_output=True, text=True, timeout=60)
        answer = json.loads(done.stdout)
        assert not answer["success"] and "404 Not Found" in answer["error-message"], (args, done.stdout)
    assert flwr(coordinator.state_dir, "ls", "local")["success"]
    assert coordinator.superlink is not None and coordinator.superlink.alive()


def test_a_device_whose_key_was_removed_registers_a_new_one(coordinator: Coordinator, tmp_path: Path) -> None:
    """Only the control plane registers keys. One removed at the SuperLink is refused as ALREADY_EXISTS (Flower
    never takes it again); the device's new key is registered and replaces it in the registry."""
    assert coordinator.registry is not None and coordinator.certs is not None
    token = coordinator.registry.enroll(["pi-restart"])["pi-restart"]
    with grpc.secure_channel(coordinator.endpoints.control_plane, channel_credentials(coordinator.certs.ca)) as ch:
        stub = DeviceStub(ch, token)
        calibration = [pb.CalibrationPoint(level=level, latency_ms=10 * d, memory_mb=100 * d)
                       for level, d in enumerate(coordinator.settings.architecture().densities)]
        _, public = supernode_key(tmp_path)

        def register(key: str) -> pb.RegisterResponse:
            return stub.Register(pb.RegisterRequest(profile="pi4", calibration=calibration, supernode_public_key=key),
                                 timeout=60)

        register(public)
        _, first = coordinator.registry.supernode_of("pi-restart")
        assert first is not None and supernode_status(coordinator.state_dir, first) == "registered"
        register(public)  # a restart with the key still registered changes nothing
        assert coordinator.registry.supernode_of("pi-restart")[1] == first
        unregister_supernode(coordinator.state_dir, first)  # the operator, on loopback
        with pytest.raises(grpc.RpcError) as caught:
            register(public)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS, caught.value.details()
        _, renewed = supernode_key(tmp_path, renew=True)
        register(renewed)
        _, second = coordinator.registry.supernode_of("pi-restart")
        assert second not in (None, first) and supernode_status(coordinator.state_dir, second) == "registered"


def test_without_nginx_a_tls_coordinator_refuses_before_starting_anything(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_proxy, "NGINX_CANDIDATES", (str(tmp_path / "no-nginx"),))
    settings = RunSettings.defaults(state_dir=str(tmp_path / "state"))
    c = Coordinator(settings, Endpoints("127.0.0.1", pick_port(), pick_port()),
                    certs=init_certificates(tmp_path / "certs", []))
    try:
        with pytest.raises(ProxyUnavailableError, match="apt-get install nginx"):
            c.start()
        assert c.superlink is None and c.proxy is None
    finally:
        c.stop()



def test_a_killed_coordinator_takes_its_proxy_along(tmp_path: Path) -> None:
    """kill -9 of `dress-fleet coordinator start --certs`: its nginx (master and worker) and SuperLink go too."""
    certs = init_certificates(tmp_path / "certs", [])
    port = pick_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    coordinator = subprocess.Popen(
        [str(Path(sys.executable).parent / "dress-fleet"), "coordinator", "start", "--certs", str(certs.directory),
         "--superlink-port", str(port), "--control-port", str(pick_port()), "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any("nginx" in p.name() for p in psutil.Process(coordinator.pid).children(recursive=True)):
            assert coordinator.poll() is None and time.monotonic() < deadline, "the coordinator never started nginx"
            time.sleep(0.5)
        time.sleep(2)  # nginx's worker too
        tree = psutil.Process(coordinator.pid).children(recursive=True)
        assert sum("nginx" in p.name() for p in tree) == 2
    finally:
        coordinator.kill()
        coordinator.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
    require_free_port("127.0.0.1", port, "fleet proxy")  # nothing listens on the public port any more
