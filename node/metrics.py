"""Prometheus metrics of one node, in a registry of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from knexa.net.mesh import Mesh
    from knexa.net.traffic import TrafficCounter


class _MeshCollector(Collector):
    """Reads the live mesh and traffic counters at scrape time."""

    def __init__(self, mesh: Mesh, traffic: TrafficCounter, started_at: float) -> None:
        self.mesh, self.traffic, self.started_at = mesh, traffic, started_at

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("knexa_peers_connected", "Peers currently connected", len(self.mesh.table))
        yield GaugeMetricFamily("knexa_streams_open", "libp2p streams open", self.mesh.streams_open())
        yield GaugeMetricFamily(
            "knexa_uptime_seconds", "Seconds since the daemon started", time.time() - self.started_at
        )
        yield CounterMetricFamily("knexa_received_bytes", "Bytes received, all connections", self.traffic.bytes_in)
        yield CounterMetricFamily("knexa_sent_bytes", "Bytes sent, all connections", self.traffic.bytes_out)
        yield CounterMetricFamily("knexa_peer_connects", "Peer connections opened", self.mesh.connects)
        yield CounterMetricFamily("knexa_peer_disconnects", "Peer connections closed", self.mesh.disconnects)


class NodeMetrics:
    def __init__(self, mesh: Mesh, traffic: TrafficCounter, started_at: float) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_MeshCollector(mesh, traffic, started_at))

    def render(self) -> str:
        return generate_latest(self.registry).decode()
