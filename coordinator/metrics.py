"""The coordinator's metrics in Prometheus' exposition format, for the monitoring an operator already runs.

What the registry holds is read at each scrape (devices by status and density, rounds, their duration,
participants and bytes, refused updates by kind, withheld rounds), so the figures are the fleet's wherever the
ServerApp that recorded them ran; what only this process sees is counted as it happens (heartbeats answered).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.registry import Registry
from coordinator.validation import REFUSALS

ROUND_SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class RegistryCollector(Collector):
    """The fleet as the registry has it, read when scraped."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily("dress_devices", "Devices by status, profile and assigned density",
                                    labels=["status", "profile", "density"])
        for (status, profile, density), n in sorted(self.registry.device_counts().items()):
            devices.add_metric([str(status), profile, f"{density:g}"], n)
        yield devices

        rounds = self.registry.list_rounds()
        yield CounterMetricFamily("dress_rounds", "Training rounds recorded", value=len(rounds))
        yield CounterMetricFamily("dress_rounds_withheld", "Rounds whose model was not published",
                                  value=sum(bool(r.details.get("withheld")) for r in rounds))
        walls = [float(r.details["wall_s"]) for r in rounds if "wall_s" in r.details]
        buckets = [(f"{bound:g}", sum(w <= bound for w in walls)) for bound in ROUND_SECONDS_BUCKETS]
        yield HistogramMetricFamily("dress_round_duration_seconds", "Wall time of each recorded round",
                                    buckets=[*buckets, ("+Inf", len(walls))], sum_value=sum(walls))
        participants = GaugeMetricFamily("dress_round_participants", "Devices whose update counted in the last "
                                         "round, by the density they trained", labels=["density"])
        for density, n in _by_density(rounds[-1].participants.values() if rounds else []).items():
            participants.add_metric([density], n)
        yield participants
        transferred = CounterMetricFamily("dress_round_bytes", "Model bytes sent to and received from devices "
                                          "in training rounds", labels=["direction"])
        transferred.add_metric(["down"], sum(r.bytes_sent for r in rounds))
        transferred.add_metric(["up"], sum(r.bytes_received for r in rounds))
        yield transferred
        refused = CounterMetricFamily("dress_refused_updates", "Device updates that did not count, by why "
                                      "(coordinator.validation.REFUSALS)", labels=["reason"])
        for kind in REFUSALS:
            refused.add_metric([kind], sum(int(r.details.get("refused", {}).get(kind, 0)) for r in rounds))
        yield refused


def _by_density(densities: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    for density in densities:  # type: ignore[attr-defined]
        counts[f"{density:g}"] = counts.get(f"{density:g}", 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -float(item[0])))


class FleetMetrics:
    """One coordinator's metrics: the registry's, read at each scrape, and its control plane's counters."""

    def __init__(self, registry: Registry) -> None:
        self.collectors = CollectorRegistry()
        self.collectors.register(RegistryCollector(registry))
        self.heartbeats = Counter("dress_heartbeats", "Heartbeats the control plane answered",
                                  registry=self.collectors)
