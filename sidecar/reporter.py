"""Reports each decision once: a span, a JSON log line and metric samples; and what a relayed
tunnel or stream did when it ends (its lifetime, the bytes its upstream connection carried)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span

from sidecar.decision_log import DecisionLog
from sidecar.destinations import DestinationSummary
from sidecar.metrics import CounterSeries, HistogramSeries, Metrics, call_kind, tcp_bytes
from sidecar.record import DecisionRecord
from sidecar.telemetry.spans import DecisionSpans


@dataclass(slots=True)
class OpenDecision:
    """A decision whose outcome (status code, upstream error) is still to come."""

    record: DecisionRecord
    span: Span
    start_ns: int  # time.time_ns() when the call started
    done: bool = False


class Reporter:
    def __init__(
        self,
        spans: DecisionSpans,
        log: DecisionLog,
        metrics: Metrics,
        destinations: DestinationSummary | None = None,
    ) -> None:
        self._spans = spans
        self._log = log
        self._metrics = metrics
        # /debug/destinations: fed here because every decision passes through end().
        self._destinations = destinations
        # labels(...) validates and looks up its child each call; the label sets are few
        # (decision x reason x capture x kind), so keep each one's counter and histogram series.
        self._children: dict[tuple[str, str, str, str], tuple[CounterSeries, HistogramSeries]] = {}
        self._tunnel_durations: dict[tuple[str, str, str], HistogramSeries] = {}
        self._bytes: dict[str, tuple[Any, Any]] = {}
        # Read by the egress_open_tunnels gauge when scraped.
        self.open_tunnels = 0

    def begin(
        self, rec: DecisionRecord, *, parent: Context | None = None, start_ns: int | None = None
    ) -> OpenDecision:
        if start_ns is None:
            start_ns = time.time_ns()
        return OpenDecision(rec, self._spans.start(rec, parent=parent, start_ns=start_ns), start_ns)

    def end(self, open_decision: OpenDecision) -> None:
        if open_decision.done:
            return
        open_decision.done = True
        rec = open_decision.record
        self._spans.finish(open_decision.span, rec)
        self._log.write(rec)
        d = rec.decision
        # _value_: the plain attribute behind Enum.value (a descriptor costing ~1 us a read).
        key = (
            d.verdict._value_,
            d.reason._value_,
            rec.capture._value_,
            call_kind(rec.protocol),
        )
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._metrics.decisions.labels(key[0], key[1], key[2]),
                self._metrics.request_duration.labels(key[0], key[2], key[3]),
            )
        children[0].inc()
        children[1].observe((time.time_ns() - open_decision.start_ns) * 1e-9)
        if self._destinations is not None:
            self._destinations.add(rec)

    def report(self, rec: DecisionRecord, *, start_ns: int | None = None) -> None:
        self.end(self.begin(rec, start_ns=start_ns))

    # -- relayed tunnels and streams (the fast path's CONNECT tunnels and transparent streams) --

    def relay_started(self) -> int:
        """Counts an open relay; returns the time (time.time_ns()) for a caller without one."""
        self.open_tunnels += 1
        return time.time_ns()

    def relay_ended(
        self, rec: DecisionRecord, start_ns: int, upstream: asyncio.BaseTransport | None
    ) -> None:
        """Once per relay, when its first side is gone: its lifetime, and the bytes of its
        upstream connection as the kernel counted them (bytes still in a write buffer at that
        moment are not in them)."""
        self.open_tunnels -= 1
        kind = call_kind(rec.protocol)
        key = (rec.decision.verdict._value_, rec.capture._value_, kind)
        duration = self._tunnel_durations.get(key)
        if duration is None:
            duration = self._tunnel_durations[key] = self._metrics.tunnel_duration.labels(*key)
        duration.observe((time.time_ns() - start_ns) * 1e-9)
        self.upstream_closed(kind, upstream)

    def upstream_closed(self, kind: str, upstream: asyncio.BaseTransport | None) -> None:
        """Counts an upstream connection's bytes as it ends (plain HTTP: as the pool's
        connection closes, after all the requests it carried)."""
        counted = tcp_bytes(upstream.get_extra_info("socket") if upstream is not None else None)
        if counted is None:
            return
        counters = self._bytes.get(kind)
        if counters is None:
            counters = self._bytes[kind] = (
                self._metrics.upstream_sent.labels(kind),
                self._metrics.upstream_received.labels(kind),
            )
        counters[0].inc(counted[0])
        counters[1].inc(counted[1])
