"""RPC metrics: a plain snapshot dict, and a collector for a prometheus registry."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out


class RpcMetrics:
    """Counters for one node's RPC service. `role` is "client" or "server"."""

    def __init__(self) -> None:
        self.calls: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected: defaultdict[str, int] = defaultdict(int)
        self.latency: defaultdict[tuple[str, str], _Histogram] = defaultdict(_Histogram)

    def record_call(self, role: str, method: str, outcome: str, seconds: float) -> None:
        self.calls[(role, method, outcome)] += 1
        self.latency[(role, method)].observe(seconds)

    def record_rejected(self, reason: str) -> None:
        """Traffic refused before it became a call (bad frames, bad signatures...)."""
        self.rejected[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": [
                {"role": r, "method": m, "outcome": o, "count": n}
                for (r, m, o), n in sorted(self.calls.items())
            ],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": dict(self.rejected),
            "latency_seconds": {
                f"{r}:{m}": {"count": h.count, "sum": h.total, "buckets": dict(h.cumulative())}
                for (r, m), h in sorted(self.latency.items())
            },
        }

    def register(self, registry: CollectorRegistry, prefix: str = "knexa_rpc") -> Collector:
        """Expose these metrics through `registry`; returns the collector (to unregister)."""
        collector = _RpcCollector(self, prefix)
        registry.register(collector)
        return collector


class _RpcCollector(Collector):
    def __init__(self, metrics: RpcMetrics, prefix: str) -> None:
        self._m = metrics
        self._p = prefix

    def collect(self) -> Iterator[Metric]:
        m, p = self._m, self._p
        calls = CounterMetricFamily(f"{p}_calls", "RPC calls by role, method and outcome",
                                    labels=["role", "method", "outcome"])
        for (role, method, outcome), n in m.calls.items():
            calls.add_metric([role, method, outcome], n)
        yield calls
        traffic = CounterMetricFamily(f"{p}_bytes", "RPC frame bytes by direction",
                                      labels=["direction"])
        traffic.add_metric(["in"], m.bytes_in)
        traffic.add_metric(["out"], m.bytes_out)
        yield traffic
        rejected = CounterMetricFamily(f"{p}_rejected", "Inbound RPC traffic refused",
                                       labels=["reason"])
        for reason, n in m.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        hist = HistogramMetricFamily(f"{p}_latency_seconds", "RPC call latency",
                                     labels=["role", "method"])
        for (role, method), h in m.latency.items():
            hist.add_metric([role, method], h.cumulative(), h.total)
        yield hist
