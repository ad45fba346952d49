"""What a client sees when a plain-HTTP request or a CONNECT is denied (mitmproxy's response
objects; the text and headers come from sidecar.answers, shared with the fast path)."""

from __future__ import annotations

from mitmproxy import http

from sidecar.answers import (
    answer_headers,
    denial_body,
    failure_body,
    failure_phrase,
    failure_status,
)
from sidecar.record import DecisionRecord

__all__ = [
    "denial_body",
    "denial_response",
    "egress_response",
    "failure_phrase",
    "failure_response",
    "failure_status",
]


def egress_response(
    status: int, body: str, rec: DecisionRecord, reason: str, error_type: str | None = None
) -> http.Response:
    """Every answer the sidecar writes itself: one line of text, the decision headers, closed."""
    return http.Response.make(status, body.encode(), dict(answer_headers(rec, reason, error_type)))


def denial_response(rec: DecisionRecord, status: int = 403) -> http.Response:
    return egress_response(status, denial_body(rec), rec, rec.decision.reason.value)


def failure_response(rec: DecisionRecord, status: int) -> http.Response:
    """Our answer when an allowed request's upstream fails before responding (502/504).

    ``x-egress-decision`` stays the decision (allow, or audit); ``x-egress-reason`` says what
    failed, as a CONNECT's 502/504 does; ``x-egress-error`` is the span's ``error.type``.
    """
    kind = rec.error_type or "upstream_error"
    return egress_response(status, failure_body(rec), rec, failure_phrase(rec.error_type), kind)
