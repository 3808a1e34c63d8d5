"""An agent's metrics in Prometheus' exposition format: what it serves and how fast, for the fleet's monitoring.

Served by prometheus_client's own HTTP server, behind the same mutual TLS as Predict (a client certificate the
fleet CA signed: Prometheus' ``tls_config`` with ``cert_file`` and ``key_file``); plaintext on loopback only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.served_model import ServedModel

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 50062  # beside Predict's 50061
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServedCollector(Collector):
    """The density served now and the one the coordinator assigned, read when scraped."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    def collect(self) -> Iterator[Metric]:
        state = self.served.state()
        density = GaugeMetricFamily("dress_agent_density", "The density Predict serves now (serving) and the "
                                    "coordinator's assignment, its cap (assigned)", labels=["kind"])
        density.add_metric(["serving"], state.density)
        density.add_metric(["assigned"], state.assigned_density)
        yield density


class AgentMetrics:
    """One agent's metrics: Predict's latency and deadline misses per density, heartbeats, what it serves."""

    def __init__(self, served: ServedModel) -> None:
        self.collectors = CollectorRegistry()
        self.collectors.register(ServedCollector(served))
        self.predict_latency = Histogram("dress_agent_predict_latency_seconds", "Predict's forward pass, by the "
                                         "density that answered", ["density"], buckets=LATENCY_BUCKETS_S,
                                         registry=self.collectors)
        self.deadline_misses = Counter("dress_agent_deadline_misses", "Predict requests answered after their "
                                       "deadline_ms, by the density that answered", ["density"],
                                       registry=self.collectors)
        self.heartbeats = Counter("dress_agent_heartbeats", "Heartbeats to the coordinator, by outcome",
                                  ["outcome"], registry=self.collectors)
        for outcome in ("answered", "failed"):
            self.heartbeats.labels(outcome)

    def predicted(self, density: float, latency_ms: float, deadline_ms: float) -> None:
        label = f"{density:g}"
        self.predict_latency.labels(label).observe(latency_ms / 1000)
        if 0 < deadline_ms < latency_ms:
            self.deadline_misses.labels(label).inc()
        else:
            self.deadline_misses.labels(label)  # a density that answered shows, at 0 misses

    def serve(self, host: str, port: int, tls: tuple[Path, Path, Path] | None) -> tuple[object, int]:
        """Start the HTTP listener; ``tls`` = (ca, certificate, key): mutual TLS, a client certificate the CA
        signed required. Returns the server (``shutdown()`` stops it) and the port bound."""
        ca, cert, key = tls if tls else (None, None, None)
        server, _ = start_http_server(port, host, self.collectors, certfile=None if cert is None else str(cert),
                                      keyfile=None if key is None else str(key),
                                      client_cafile=None if ca is None else str(ca),
                                      client_auth_required=tls is not None)
        bound = server.server_address[1]
        log.info("agent metrics on %s://%s:%d/metrics", "https" if tls else "http", host, bound)
        return server, bound
