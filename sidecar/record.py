"""One decision with everything known about the call: what logs, spans and metrics report.

Pure data shared by the proxy adapter (which fills it) and the telemetry and log adapters (which
report it), so neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sidecar.policy.model import Decision, Verdict


class Capture(StrEnum):
    EXPLICIT = "explicit"
    TRANSPARENT = "transparent"


@dataclass(slots=True)
class DecisionRecord:
    decision: Decision
    capture: Capture
    protocol: str  # span name: HTTP method, "CONNECT", "TLS" or "TCP"
    host: str | None  # the name asked for (Host, CONNECT authority, SNI); None when unknown
    port: int
    policy_source: str
    policy_version: str
    mode: str
    peer_address: str | None = None  # the address connected to (or that would have been)
    original_address: str | None = None  # transparent: the destination the app dialled
    client_address: str | None = None
    method: str | None = None
    url: str | None = None  # plain HTTP only, credentials redacted
    status_code: int | None = None
    tls_passthrough: bool = False
    # The app's TLS was terminated here (inspect: true): the channel, and each request in it.
    tls_inspected: bool = False
    error: str | None = None  # failure after an allow, e.g. "connection refused"
    # Its low-cardinality category (span error.type), where the adapter knows it better than the
    # message says, e.g. which side ended the exchange; None: derived from ``error``.
    error_type: str | None = None

    @property
    def verdict(self) -> Verdict:
        return self.decision.verdict
