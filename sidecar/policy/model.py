"""Values of the decision core: destinations, decisions, rules. No I/O here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

type IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
type IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    AUDIT = "audit"  # would have been denied; let through because the mode is audit


class Mode(StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"


class Reason(StrEnum):
    MATCHED_ALLOW = "matched allow rule"
    MATCHED_DENY = "matched deny rule"
    NO_MATCH = "no allow rule matches"
    PRIVATE_ADDRESS = "private address"
    POLICY_NOT_LOADED = "policy not loaded"
    POLICY_DELETED = "policy deleted"
    INVALID_DESTINATION = "invalid destination"
    UNRESOLVABLE = "host does not resolve"
    SNI_MISMATCH = "sni mismatch"  # a tunnel's ClientHello names another host than its CONNECT
    UNREADABLE_FIRST_FLIGHT = "unreadable first flight"  # looks like TLS; no ClientHello read
    # An allow rule with methods/paths cannot grant a channel where they are not visible.
    L7_NOT_VISIBLE = "l7 conditions not visible"
    # Request heads beyond the proxy's limits (sidecar.proxy.headlimits).
    REQUEST_LINE_TOO_LONG = "request line too long"
    HEAD_TOO_LARGE = "request head too large"
    HEAD_TIMEOUT = "request head timeout"
    INVALID_REQUEST = "invalid request"  # a head HTTP/1 forbids (smuggling shapes, bad framing)
    # DNS queries (sidecar.policy.dns): names under the pod's search domains and the configured
    # internal domains are forwarded whatever the policy; zone transfers and ANY never are.
    CLUSTER_INTERNAL = "cluster-internal name"
    QUERY_TYPE = "query type not allowed"
    # HTTPS inspection (``inspect: true``): the CA to issue leaf certificates is missing or
    # unreadable, so an inspected host cannot be inspected: denied (fail closed).
    INSPECTION_CA_UNAVAILABLE = "inspection CA not available"


@dataclass(frozen=True, slots=True)
class Destination:
    """What the proxy knows about one outbound call.

    ``host`` is the name the client asked for (None for an address-only flow such as raw TCP or
    TLS without SNI); an IP literal host is allowed and is treated as an address. ``address`` is the
    resolved or original IP the proxy would connect to, when known. ``method``/``path`` are set only
    where the request is visible (plain HTTP, or an HTTPS request inside an inspected TLS
    connection). ``inspected``: a TLS channel to a host the policy inspects, whose requests are
    each decided afterwards: the rules' methods/paths are deferred to them, not failed.
    """

    host: str | None
    port: int
    address: IPAddress | None = None
    method: str | None = None
    path: str | None = None
    inspected: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: Reason
    rule: str | None = None  # the rule as written in the allowlist, where one matched
    detail: str | None = None  # e.g. "10.0.0.1 is private" or "method POST not in [GET]"

    @property
    def permits(self) -> bool:
        """True when the call goes through (allow or audit)."""
        return self.verdict is not Verdict.DENY


@dataclass(frozen=True, slots=True)
class PolicyMeta:
    """Where a policy came from: shown on spans, logs, metrics and health."""

    source: str  # e.g. "configmap:shop/egress-allowlist" or "file:/etc/egress/allowlist.yaml"
    version: str  # ConfigMap resourceVersion, or "sha256:<12 hex>" digest of a file
    mode: Mode | None = None  # the document's own `mode:`, if it set one
    extra: dict[str, str] = field(default_factory=dict)
