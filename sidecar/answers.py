"""Every answer the sidecar writes itself (a denial, a refused head, an upstream failure): the
text, the decision headers and the bytes. Pure: both engines (the fast path and mitmproxy) render
the same answer from these."""

from __future__ import annotations

from http import HTTPStatus

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


def answer_headers(
    rec: DecisionRecord, reason: str, error_type: str | None = None
) -> list[tuple[str, str]]:
    """The headers of every answer: what was decided, why, and the connection closes."""
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("x-egress-decision", rec.verdict.value),
        ("x-egress-reason", reason),
    ]
    if error_type is not None:
        headers.append(("x-egress-error", error_type))
    headers += [("x-egress-policy-version", rec.policy_version or "-"), ("connection", "close")]
    return headers


# By the span's error.type: the phrase a client reads in x-egress-reason when an allowed call's
# upstream failed (the decision stays in x-egress-decision: allow; the type in x-egress-error).
_FAILURE_PHRASES = {
    "connection_refused": "upstream connection refused",
    "connection_reset": "upstream connection reset",
    "timeout": "upstream timeout",
    "host_unreachable": "upstream unreachable",
    "upstream_disconnected": "upstream disconnected",
    "upstream_certificate_invalid": "upstream certificate invalid",
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


def connect_failure_body(rec: DecisionRecord, reason: str, error: str) -> str:
    """A CONNECT (or a transparent stream) whose upstream could not be reached."""
    target = format_hostport(rec.host or rec.peer_address or "-", rec.port)
    via = f" ({rec.peer_address})" if rec.peer_address and rec.peer_address != rec.host else ""
    return (
        f"egress-sidecar could not reach {target}{via} for {rec.protocol}: {reason} ({error}); "
        f"policy {rec.policy_source or '-'} version {rec.policy_version or '-'}\n"
    )


def render(status: int, body: str, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 response with a Content-Length body, as bytes on the wire."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def denial_bytes(rec: DecisionRecord, status: int = 403) -> bytes:
    return render(status, denial_body(rec), answer_headers(rec, rec.decision.reason.value))


def failure_bytes(rec: DecisionRecord, status: int) -> bytes:
    """Our answer when an allowed request's upstream fails before responding (502/504)."""
    kind = rec.error_type or "upstream_error"
    return render(
        status, failure_body(rec), answer_headers(rec, failure_phrase(rec.error_type), kind)
    )
