"""Prometheus metrics of one sidecar process, served on :15021/metrics.

One registry per process (not the client's global one) so tests can run several sidecars'
worth of metrics in one interpreter without collisions.
"""

from __future__ import annotations

import math
import socket
import struct
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "call_kind", "tcp_bytes"]

# A call's kind for metric labels: the span name (an HTTP method, CONNECT, TLS, TCP, DNS) folded
# into five values, so that a client sending made-up methods cannot grow the series.
KINDS: Final = {"CONNECT": "connect", "TLS": "tls", "TCP": "tcp", "DNS": "dns"}


def call_kind(protocol: str) -> str:
    return KINDS.get(protocol, "http")


# Linux struct tcp_info: tcpi_bytes_acked (u64) at 120, tcpi_bytes_received (u64) at 128
# (kernel 4.1/4.2 and later). The kernel counts a connection's bytes for free; reading them once
# when it ends costs one getsockopt instead of a counter update per chunk.
_TCP_INFO_BYTES: Final = struct.Struct("=QQ")
_TCP_INFO_BYTES_OFFSET: Final = 120
_TCP_INFO_LEN: Final = _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size


class _TcpSocket(Protocol):
    """socket.socket, or the asyncio.trsock.TransportSocket a transport's extra info holds."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def tcp_bytes(sock: _TcpSocket | None) -> tuple[int, int] | None:
    """(bytes sent and acknowledged by the peer, bytes received) of a TCP socket; None when it
    is closed already or the kernel's tcp_info is too short to hold them."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(raw, _TCP_INFO_BYTES_OFFSET)
    # The kernel counts sequence numbers: the acknowledged SYN is one of them (and a FIN, when
    # acknowledged or received, one more: not told apart, one byte per connection at most).
    return max(0, int(acked) - 1), int(received)


class HistogramSeries:
    """One label set's buckets: a bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LeanFamily[S]:
    """A metric family for the per-call path, registered as a collector: its label sets' series
    are plain objects updated without a lock (prometheus_client's Histogram takes one per bucket
    and for its sum, ~2.5 us an observation; its Counter ~1.3 us an increment). Updates come from
    the event loop's thread; the scrape (another thread) copies each series, so it may see one
    observation's bucket without its sum: off by one call for one scrape, never corrupted."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        registry.register(self)  # a Collector: describe() and collect()

    def _new_series(self) -> S:
        raise NotImplementedError

    def labels(self, *values: str) -> S:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = self._new_series()
        return series

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class LeanHistogram(_LeanFamily[HistogramSeries]):
    """A Prometheus histogram: a bisect and two additions (~0.3 us) per observation."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _new_series(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in list(self._series.items()):
            counts, total = list(series.counts), series.total
            cumulative, running = [], 0
            for le, count in zip(self._les, counts, strict=True):
                running += count
                cumulative.append((le, float(running)))
            family.add_metric(list(values), cumulative, total)
        yield family


class LeanCounter(_LeanFamily[CounterSeries]):
    """A counter: an addition (~0.1 us) per increment; exposed as ``<name>_total``."""

    def _new_series(self) -> CounterSeries:
        return CounterSeries()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in list(self._series.items()):
            family.add_metric(list(values), series.value)
        yield family


# Seconds. A decision answered from memory takes ~0.1 ms; a resolve or an upstream's response
# head may take seconds.
REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# A tunnel lives as long as its client keeps it: from milliseconds to hours.
TUNNEL_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Updated for every call: the lean kinds (no lock, a few additions).
        self.decisions = LeanCounter(
            "egress_decisions",
            "Outbound calls decided, by decision, reason and capture mode.",
            ["decision", "reason", "capture"],
            self.registry,
        )
        self.policy_info = Gauge(
            "egress_policy_info",
            "The policy version in force (value 1), labelled by source and version.",
            ["source", "version"],
            registry=self.registry,
        )
        self.policy_loaded = Gauge(
            "egress_policy_loaded",
            "1 while a policy is loaded and enforced, 0 before the first good load.",
            registry=self.registry,
        )
        self.reloads = Counter(
            "egress_policy_reloads",
            "Policy load attempts by source and result (applied, invalid, deleted, error).",
            ["source", "result"],
            registry=self.registry,
        )
        self.last_reload_error = Gauge(
            "egress_policy_last_invalid_timestamp_seconds",
            "Unix time of the last rejected policy version, by source.",
            ["source"],
            registry=self.registry,
        )
        self.source_connected = Gauge(
            "egress_policy_source_connected",
            "1 while the Kubernetes API answers for this ConfigMap source, 0 while it fails "
            "(the last good version stays in force).",
            ["source"],
            registry=self.registry,
        )
        self.source_errors = Counter(
            "egress_policy_source_errors",
            "Failed list/watch requests to the Kubernetes API, by source.",
            ["source"],
            registry=self.registry,
        )

        self.dns_queries = Counter(
            "egress_dns_queries",
            "DNS queries answered by the DNS listener, by decision and reason.",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.dns_learned = Gauge(
            "egress_dns_learned_addresses",
            "(name, address) pairs learned from DNS answers that raw-TCP host rules may use.",
            registry=self.registry,
        )

        # Per call: from its start (the request head, the CONNECT, the accepted connection) to
        # its report (an HTTP request: its response; a tunnel or stream: decided and connected).
        self.request_duration = LeanHistogram(
            "egress_request_duration_seconds",
            "Time from a call's start to its decision's report (plain HTTP: the response), "
            "by decision, capture and kind (http, connect, tls, tcp, dns).",
            ["decision", "capture", "kind"],
            REQUEST_BUCKETS,
            self.registry,
        )
        # Per relayed tunnel or stream, when it ends: its whole life.
        self.tunnel_duration = LeanHistogram(
            "egress_tunnel_duration_seconds",
            "Lifetime of relayed tunnels and transparent streams, from their start to the end "
            "of the relay, by decision, capture and kind (connect, tls, tcp).",
            ["decision", "capture", "kind"],
            TUNNEL_BUCKETS,
            self.registry,
        )
        self.upstream_sent = Counter(
            "egress_upstream_sent_bytes",
            "Bytes sent to upstreams and acknowledged by them (the kernel's count, read when "
            "an upstream connection ends), by kind (http, connect, tls, tcp).",
            ["kind"],
            registry=self.registry,
        )
        self.upstream_received = Counter(
            "egress_upstream_received_bytes",
            "Bytes received from upstreams (the kernel's count, read when an upstream "
            "connection ends), by kind (http, connect, tls, tcp).",
            ["kind"],
            registry=self.registry,
        )
        # Values read when scraped (set_function in `run`): nothing to update per connection.
        self.open_connections = Gauge(
            "egress_open_connections",
            "Client connections accepted by the proxy listeners and not yet closed.",
            registry=self.registry,
        )
        self.open_tunnels = Gauge(
            "egress_open_tunnels",
            "Tunnels and transparent streams relaying bytes now.",
            registry=self.registry,
        )

        self.spans_dropped = Counter(
            "egress_trace_spans_dropped",
            "Spans dropped because the export queue was full (collector slow or unreachable).",
            registry=self.registry,
        )

    def set_policy_info(self, source: str, version: str) -> None:
        """Exactly one egress_policy_info series: the version in force."""
        self.policy_info.clear()
        self.policy_info.labels(source=source, version=version).set(1)
        self.policy_loaded.set(1)

    def clear_policy_info(self) -> None:
        self.policy_info.clear()
        self.policy_loaded.set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
