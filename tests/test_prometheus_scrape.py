"""A real Prometheus (Debian's) scrapes the coordinator's operator listener with an operator's credential and an
agent's metrics with the fleet's client certificate, both over TLS; a scrape job without the credential is
refused (its target is down)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import architecture, enrolled

from agent.calibration import initial_model
from agent.metrics import AgentMetrics
from agent.served_model import ServedModel
from coordinator.control_plane import serve
from coordinator.metrics import FleetMetrics
from coordinator.operator_api import OperatorListener, operator_app
from coordinator.registry import Registry
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from runtime.certificates import init_certificates, issue_certificate
from runtime.processes import pick_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ARCH = architecture("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 4)

pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).is_file(),
                                reason="Debian's prometheus is not installed (make setup installs it)")


def _query(port: int, expression: str) -> dict[str, float]:
    """Prometheus' answer to ``expression``, by job."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as reply:
        result = json.loads(reply.read())["data"]["result"]
    return {r["metric"].get("job", ""): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_the_coordinator_and_an_agent_over_tls(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs", ["127.0.0.1"])
    agent_cert, agent_key = issue_certificate(certs.directory, "pi-1", ["127.0.0.1"], client=False)
    client_cert, client_key = issue_certificate(certs.directory, "prometheus", [], client=True)
    registry = Registry(state_dir=tmp_path / "state")
    secret = tmp_path / "operator.secret"
    secret.write_text(registry.add_operator("prometheus"))
    metrics = FleetMetrics(registry)
    control_port, operator_port, web_port = pick_port(), pick_port(), pick_port()
    control = serve(registry, "127.0.0.1", control_port, ARCH, lambda v, d, h: b"", metrics=metrics)
    listener = OperatorListener(operator_app(registry, metrics), "127.0.0.1", operator_port, certs).start()
    agent = AgentMetrics(ServedModel(initial_model(ARCH), 0.5))
    agent_server, agent_port = agent.serve("127.0.0.1", 0, (certs.ca, agent_cert, agent_key))
    with grpc.insecure_channel(f"127.0.0.1:{control_port}") as channel:
        device = enrolled(channel, registry, "pi-1")
        device.Register(pb.RegisterRequest(name="pi-1", profile="pi4", calibration=[
            pb.CalibrationPoint(level=level, latency_ms=100 * d, memory_mb=800 * d)
            for level, d in enumerate(ARCH.densities)]))
        for _ in range(2):
            device.Heartbeat(pb.HeartbeatRequest(budget=pb.Budget(latency_ms=1000, memory_mb=4000)))
    config = tmp_path / "prometheus.yml"
    tls = {"ca_file": str(certs.ca)}
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "coordinator", "scheme": "https", "tls_config": tls,
             "authorization": {"credentials_file": str(secret)},
             "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
            {"job_name": "stranger", "scheme": "https", "tls_config": tls,
             "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
            {"job_name": "agent", "scheme": "https",
             "tls_config": {**tls, "cert_file": str(client_cert), "key_file": str(client_key)},
             "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]},
        ]}))
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"), start_new_session=True)
    try:
        deadline, up = time.monotonic() + 60, {}
        while set(up) != {"coordinator", "stranger", "agent"}:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"targets never scraped: {up}"
            time.sleep(0.5)
            try:
                up = _query(web_port, "up")
            except OSError:
                continue
        assert up == {"coordinator": 1.0, "agent": 1.0, "stranger": 0.0}  # no credential, no metrics
        assert _query(web_port, "dress_heartbeats_total") == {"coordinator": 2.0}
        assert _query(web_port, 'dress_devices{status="online"}') == {"coordinator": 1.0}
        assert _query(web_port, 'dress_agent_density{kind="assigned"}') == {"agent": 0.5}
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        agent_server.shutdown()  # type: ignore[attr-defined]
        listener.stop()
        control.stop(grace=None).wait()
        registry.close()
