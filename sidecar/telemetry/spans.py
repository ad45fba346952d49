"""One CLIENT span per decision, attributes as shared/DESIGN.md fixes them."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, cast

from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from sidecar.memo import remember
from sidecar.policy.model import Verdict
from sidecar.record import DecisionRecord
from sidecar.telemetry import otlp_wire

if TYPE_CHECKING:
    from sidecar.telemetry.lean import LeanSpan, LeanTracer

_propagator = TraceContextTextMapPropagator()
# A decision span's parent is the caller's trace context it is given, or none: never a span
# that happens to be current where the decision is reported.
_ROOT = Context()

DENIED_ERROR_TYPE = "egress_denied"
UPSTREAM_CERT_INVALID = "upstream_certificate_invalid"
# The app refused the inspection leaf certificate (it does not trust the CA, or pins).
TLS_CLIENT_REJECTED = "tls_client_rejected"

# error.type must have low cardinality: a category, the message goes in egress.upstream.error.
_ERROR_TYPES = (
    (("refused", "errno 111"), "connection_refused"),
    # asyncio reports a connect that the OS gave up on as "[Errno 110] Connect call failed".
    (("timed out", "timeout", "errno 110"), "timeout"),
    (("unreachable", "errno 113", "errno 101"), "host_unreachable"),
    (("reset", "errno 104"), "connection_reset"),
    # An inspected upstream whose certificate failed verification (its own answer: 502).
    (("certificate verify failed", "upstream certificate invalid"), UPSTREAM_CERT_INVALID),
    (("certificate", "tls", "ssl"), "tls_error"),
)


def error_type(message: str) -> str:
    text = message.lower()
    for needles, category in _ERROR_TYPES:
        if any(n in text for n in needles):
            return category
    return "upstream_error"


def decision_attributes(rec: DecisionRecord) -> dict[str, AttributeValue]:
    """Attributes known when the decision is made (the sampler sees these)."""
    d = rec.decision
    attrs: dict[str, AttributeValue] = {
        "egress.decision": d.verdict._value_,
        "egress.reason": d.reason._value_,
        "egress.policy.source": rec.policy_source,
        "egress.policy.version": rec.policy_version,
        "egress.capture": rec.capture._value_,
        "egress.tls.passthrough": rec.tls_passthrough,
        "egress.tls.inspected": rec.tls_inspected,
        "egress.mode": rec.mode,
    }
    if rec.port:  # 0: not known (a request head refused before its target could be read)
        attrs["server.port"] = rec.port
    if d.rule is not None:
        attrs["egress.rule"] = d.rule
    if d.detail is not None:
        attrs["egress.reason.detail"] = d.detail
    server = rec.host or rec.original_address or rec.peer_address
    if server:
        attrs["server.address"] = server
    peer = rec.peer_address or rec.original_address
    if peer:
        attrs["network.peer.address"] = peer
    if rec.original_address:
        attrs["egress.original_destination"] = rec.original_address
    if rec.client_address:
        attrs["client.address"] = rec.client_address
    if rec.method:
        attrs["http.request.method"] = rec.method
    if rec.url:
        attrs["url.full"] = rec.url
    if d.verdict is Verdict.DENY:
        attrs["error.type"] = DENIED_ERROR_TYPE
    return attrs


def extract_parent(headers: Mapping[str, str]) -> Context:
    """The W3C trace context an incoming plain-HTTP request carries (empty if none)."""
    return _propagator.extract(headers)


def inject_context(span: Span, headers: MutableMapping[str, str]) -> None:
    """Hand the upstream a traceparent naming ``span`` (replacing the incoming one).

    TraceContextTextMapPropagator.inject's fields, written from the span itself: going through
    a Context to reach the same span cost ~5 us a request. The lean pipeline's spans write
    them from their own fields (a SpanContext built for it cost as much again)."""
    w3c_headers = getattr(span, "w3c_headers", None)
    if w3c_headers is not None:
        w3c_headers(headers)
        return
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return
    headers["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if ctx.trace_state:
        headers["tracestate"] = ctx.trace_state.to_header()


_NO_FIELDS: tuple[tuple[bytes, bytes], ...] = ()


def trace_fields(span: Span) -> Sequence[tuple[bytes, bytes]]:
    """inject_context's header fields as bytes, for a request head written as bytes."""
    if span is INVALID_SPAN:
        return _NO_FIELDS  # export off, no caller's context: nothing to pass on
    w3c_fields = getattr(span, "w3c_fields", None)
    if w3c_fields is not None:
        return cast("Sequence[tuple[bytes, bytes]]", w3c_fields())
    carrier: dict[str, str] = {}
    inject_context(span, carrier)
    return [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in carrier.items()]


def _end_attributes(rec: DecisionRecord) -> list[tuple[str, AttributeValue]]:
    """Attributes known when the call ends, set over decision_attributes'."""
    out: list[tuple[str, AttributeValue]] = []
    if rec.peer_address:
        out.append(("network.peer.address", rec.peer_address))
    if rec.status_code is not None:
        out.append(("http.response.status_code", rec.status_code))
    if rec.verdict is Verdict.DENY:
        pass  # error.type is the denial's, from the start
    elif rec.error is not None:
        out.append(("error.type", rec.error_type or error_type(rec.error)))
        out.append(("egress.upstream.error", rec.error))
    elif rec.status_code is not None and rec.status_code >= 500:
        # Client span semantics: 5xx is an error, 4xx from upstream is not ours to judge.
        out.append(("error.type", str(rec.status_code)))
    return out


def _end_status(rec: DecisionRecord) -> Status | None:
    if rec.verdict is Verdict.DENY:
        return Status(StatusCode.ERROR, rec.decision.reason.value)
    if rec.error is not None:
        return Status(StatusCode.ERROR, rec.error)
    if rec.status_code is not None and rec.status_code >= 500:
        return Status(StatusCode.ERROR)
    return None


# A decision span's attributes but url.full, OTLP-encoded, by what they are read from: a pod's
# calls are a few kinds of decision (destination, rule, status) repeated, so building the dict
# and encoding its ~16 attributes per call (about a third of what export costs a call) is done
# once per kind. An upstream error's message is not kept (its own text each time), nor a record
# whose app-chosen strings (host, method, detail) run long.
_BLOCKS: dict[tuple[object, ...], bytes] = {}
_BLOCKS_MAX = 1024
_BLOCK_KEY_CHARS = 512


def decision_block(rec: DecisionRecord) -> bytes | None:
    """decision_attributes and _end_attributes of ``rec`` but url.full, encoded as a Span's
    attribute fields; None for a failed call (its error message: encoded with the span)."""
    if rec.error is not None:
        return None
    d = rec.decision
    key = (
        d.verdict._value_,
        d.reason._value_,
        d.rule,
        d.detail,
        rec.capture._value_,
        rec.policy_source,
        rec.policy_version,
        rec.mode,
        rec.port,
        rec.host,
        rec.original_address,
        rec.peer_address,
        rec.client_address,
        rec.method,
        rec.status_code,
        rec.tls_passthrough,
        rec.tls_inspected,
    )
    block = _BLOCKS.get(key)
    if block is None:
        attrs = decision_attributes(rec)
        attrs.pop("url.full", None)
        attrs.update(_end_attributes(rec))
        block = otlp_wire.attributes(otlp_wire.SPAN_ATTRIBUTES, attrs)
        if len(rec.host or "") + len(rec.method or "") + len(d.detail or "") <= _BLOCK_KEY_CHARS:
            remember(_BLOCKS, key, block, _BLOCKS_MAX)
    return block


class DecisionSpans:
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        # Export off: no span is ever recorded, so the attributes (~8 us) would be thrown away.
        self._noop = isinstance(tracer, NoOpTracer)
        # The production pipeline under the default sampler: attributes written at the end.
        # (Recognised by what it offers: importing the lean pipeline here would load it, and
        # the SDK's sampling with it, into a sidecar that exports nothing.)
        self._lean: LeanTracer | None = None
        self._deferred: type[LeanSpan] | None = None
        if getattr(tracer, "inline_sampling", False):
            self._lean = cast("LeanTracer", tracer)
            self._deferred = self._lean.span_type

    def start(
        self, rec: DecisionRecord, *, parent: Context | None = None, start_ns: int | None = None
    ) -> Span:
        if self._noop:
            if parent is None:
                return INVALID_SPAN  # what the tracer would read from the context, ~1 us
            # Still through the tracer: with a parent it hands back the caller's span, so the
            # upstream's traceparent stays the caller's (none of ours exists).
            return self._tracer.start_span(rec.protocol, context=parent)
        if self._lean is not None:
            verdict = rec.decision.verdict._value_
            return self._lean.start_decision(rec.protocol, parent, start_ns, verdict)
        return self._tracer.start_span(
            rec.protocol,
            context=parent if parent is not None else _ROOT,
            kind=SpanKind.CLIENT,
            attributes=decision_attributes(rec),
            start_time=start_ns,
        )

    def finish(self, span: Span, rec: DecisionRecord, *, end_ns: int | None = None) -> None:
        # Checked first: the span of nearly every call when export is on (one call less).
        if type(span) is self._deferred and span.deferred:
            # start_decision's span, still open: every attribute read from the record now.
            span.deferred = False
            block = decision_block(rec)
            if block is not None:  # no upstream error (decision_block's condition)
                span.block = block
                if rec.url:
                    span.url_full = rec.url
                status = _end_status(rec)
                if status is not None:
                    span.set_status(status)
                span.end(end_time=end_ns)
                return
            span.set_attributes(decision_attributes(rec))
        elif not span.is_recording():
            return  # not sampled, or export off: nothing would keep what is set here
        for key, value in _end_attributes(rec):
            span.set_attribute(key, value)
        status = _end_status(rec)
        if status is not None:
            span.set_status(status)
        span.end(end_time=end_ns)

    def record(self, rec: DecisionRecord, *, start_ns: int | None = None) -> None:
        """A decision whose span has nothing more to wait for (CONNECT, TLS, TCP, early deny)."""
        self.finish(self.start(rec, start_ns=start_ns), rec)
