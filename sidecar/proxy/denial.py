"""What a client sees when a plain-HTTP request or a CONNECT is denied."""

from __future__ import annotations

from mitmproxy import http

from sidecar.proxy.hostnames import format_hostport
from sidecar.record import DecisionRecord


def denial_body(rec: DecisionRecord) -> str:
    # Port 0: not known (a request head refused before its target could be read).
    target = format_hostport(rec.host or rec.original_address or "-", rec.port, 0)
    detail = f" ({rec.decision.detail})" if rec.decision.detail else ""
    return (
        f"egress-sidecar denied {rec.protocol} {target}: {rec.decision.reason.value}{detail}; "
        f"policy {rec.policy_source or '-'} version {rec.policy_version or '-'}\n"
    )


def egress_response(
    status: int, body: str, rec: DecisionRecord, reason: str, error_type: str | None = None
) -> http.Response:
    """Every answer the sidecar writes itself: one line of text, the decision headers, closed."""
    headers = {
        "content-type": "text/plain; charset=utf-8",
        "x-egress-decision": rec.verdict.value,
        "x-egress-reason": reason,
    }
    if error_type is not None:
        headers["x-egress-error"] = error_type
    headers |= {"x-egress-policy-version": rec.policy_version or "-", "connection": "close"}
    return http.Response.make(status, body.encode(), headers)


def denial_response(rec: DecisionRecord, status: int = 403) -> http.Response:
    return egress_response(status, denial_body(rec), rec, rec.decision.reason.value)


# By the span's error.type: the phrase a client reads in x-egress-reason when an allowed call's
# upstream failed (the decision stays in x-egress-decision: allow; the type in x-egress-error).
_FAILURE_PHRASES = {
    "connection_refused": "upstream connection refused",
    "connection_reset": "upstream connection reset",
    "timeout": "upstream timeout",
    "host_unreachable": "upstream unreachable",
    "upstream_disconnected": "upstream disconnected",
}


def failure_phrase(error_type: str | None) -> str:
    return _FAILURE_PHRASES.get(error_type or "", "upstream error")


def failure_status(error_type: str | None) -> int:
    """Gateway Timeout where the destination never answered; Bad Gateway for the rest."""
    return 504 if error_type in ("timeout", "host_unreachable") else 502


def failure_body(rec: DecisionRecord) -> str:
    target = format_hostport(rec.host or rec.original_address or "-", rec.port)
    return (
        f"egress-sidecar let {rec.protocol} {target} through ({rec.decision.reason.value}), "
        f"but the upstream failed: "
        f"{rec.error_type or 'upstream_error'} ({rec.error or '-'})\n"
    )


def failure_response(rec: DecisionRecord, status: int) -> http.Response:
    """Our answer when an allowed request's upstream fails before responding (502/504).

    ``x-egress-decision`` stays the decision (allow, or audit); ``x-egress-reason`` says what
    failed, as a CONNECT's 502/504 does; ``x-egress-error`` is the span's ``error.type``.
    """
    kind = rec.error_type or "upstream_error"
    return egress_response(status, failure_body(rec), rec, failure_phrase(rec.error_type), kind)
