"""Prometheus metrics of one sidecar process, served on :15021/metrics.

One registry per process (not the client's global one) so tests can run several sidecars'
worth of metrics in one interpreter without collisions.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "egress_decisions",
            "Outbound calls decided, by decision, reason and capture mode.",
            ["decision", "reason", "capture"],
            registry=self.registry,
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
