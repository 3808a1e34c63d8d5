"""An agent's metrics listener behind Predict's mutual TLS: a caller with the fleet's client certificate reads them,
anyone else is refused in the handshake. (What they count, through a real `dress-agent join`: test_agent_cli.)"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import architecture
from prometheus_client.parser import text_string_to_metric_families

from agent.calibration import initial_model
from agent.metrics import AgentMetrics
from agent.served_model import ServedModel
from runtime.certificates import init_certificates, issue_certificate


def _get(url: str, context: ssl.SSLContext) -> str:
    with urllib.request.urlopen(url, context=context, timeout=10) as reply:
        return reply.read().decode()


def test_metrics_answer_only_a_client_certificate_of_the_fleet(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs", ["127.0.0.1"])
    cert, key = issue_certificate(certs.directory, "pi-1", ["127.0.0.1"], client=False)
    client_cert, client_key = issue_certificate(certs.directory, "prometheus", [], client=True)
    other = init_certificates(tmp_path / "other", ["127.0.0.1"])  # another fleet's CA
    stranger_cert, stranger_key = issue_certificate(other.directory, "prometheus", [], client=True)
    served = ServedModel(initial_model(architecture("cnn", "1,0.5", "fashion-mnist", 4)), 0.5)
    metrics = AgentMetrics(served)
    metrics.predicted(0.5, 3.0, deadline_ms=2.0)
    server, port = metrics.serve("127.0.0.1", 0, (certs.ca, cert, key))
    url = f"https://127.0.0.1:{port}/metrics"
    try:
        fleet = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(url, fleet)  # no client certificate
        stranger = ssl.create_default_context(cafile=str(certs.ca))
        stranger.load_cert_chain(stranger_cert, stranger_key)
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(url, stranger)  # another fleet's
        fleet.load_cert_chain(client_cert, client_key)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(_get(url, fleet)) for s in family.samples}
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    assert samples[("dress_agent_density", (("kind", "assigned"),))] == 0.5
    assert samples[("dress_agent_deadline_misses_total", (("density", "0.5"),))] == 1
    assert samples[("dress_agent_predict_latency_seconds_bucket", (("density", "0.5"), ("le", "0.005")))] == 1
