"""DecisionSpans.finish: the status code and error.type a failed call's span carries."""

from __future__ import annotations

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, StatusCode

from sidecar.telemetry.spans import (
    DecisionSpans,
    decision_attributes,
    decision_block,
    extract_parent,
    inject_context,
    trace_fields,
)
from tests.support.records import decision_record

_record = decision_record


@pytest.mark.parametrize(
    ("fields", "status", "error_type"),
    [
        ({"status_code": 200}, 200, None),
        ({"status_code": 503}, 503, "503"),  # the upstream's own 5xx
        (
            {"status_code": 502, "error": "[Errno 111] Connect call failed"},
            502,
            "connection_refused",
        ),
        ({"status_code": 504, "error": "connect timed out"}, 504, "timeout"),
        (
            {"status_code": 504, "error": "[Errno 110] Connect call failed ('198.18.0.9', 80)"},
            504,
            "timeout",
        ),
        # the adapter knows which side ended it; mitmproxy's message does not say
        (
            {"error": "Client disconnected.", "error_type": "client_disconnected"},
            None,
            "client_disconnected",
        ),
        (
            {
                "status_code": 200,
                "error": "Client disconnected.",
                "error_type": "upstream_disconnected",
            },
            200,
            "upstream_disconnected",
        ),
        ({"error": "Client disconnected."}, None, "upstream_error"),  # no side known: generic
    ],
)
def test_a_failed_calls_span_says_what_the_client_got_and_why(
    fields: dict[str, object], status: int | None, error_type: str | None
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = DecisionSpans(provider.get_tracer("test"))
    rec = _record(**fields)
    spans.finish(spans.start(rec), rec)
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs.get("http.response.status_code") == status
    assert attrs.get("error.type") == error_type
    assert (span.status.status_code is StatusCode.ERROR) == (error_type is not None)
    if "error" in fields:
        assert attrs["egress.upstream.error"] == fields["error"]


def _decoded(block: bytes) -> dict[str, object]:
    """A block of Span attribute fields read back with opentelemetry-proto's classes."""
    span = ProtoSpan.FromString(block)
    return {a.key: getattr(a.value, str(a.value.WhichOneof("value"))) for a in span.attributes}


def test_a_decision_block_is_the_decisions_attributes_but_its_url_encoded_once() -> None:
    rec = decision_record(**_KIND, url="http://web.test/a")
    block = decision_block(rec)
    assert block is not None
    want = {k: v for k, v in decision_attributes(rec).items() if k != "url.full"}
    want["http.response.status_code"] = 200
    assert _decoded(block) == want
    # Another call of the same kind (another URL): the same bytes, not encoded again.
    again = decision_record(**_KIND, url="http://web.test/b?q=1")
    assert decision_block(again) is block
    # Any field the attributes are read from makes another kind.
    assert decision_block(decision_record(**{**_KIND, "status_code": 404})) is not block


_KIND: dict[str, object] = {
    "peer_address": "127.0.0.3",
    "client_address": "127.0.0.1",
    "method": "GET",
    "status_code": 200,
}


@pytest.mark.parametrize(
    ("fields", "kept"),
    [
        ({"error": "[Errno 111] Connect call failed"}, None),  # its message: with the span
        ({"host": "a" * 600 + ".test"}, False),  # the app's long name: encoded, not kept
        ({"method": "X" * 600}, False),
        ({}, True),
    ],
)
def test_what_a_decision_block_keeps(fields: dict[str, object], kept: bool | None) -> None:
    rec = decision_record(**{**_KIND, **fields})
    block = decision_block(rec)
    if kept is None:
        assert block is None
        return
    assert block is not None
    assert (decision_block(decision_record(**{**_KIND, **fields})) is block) == kept


CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("export", [True, False])
@pytest.mark.parametrize("caller", [True, False])
def test_the_trace_fields_are_what_inject_context_writes_as_bytes(
    export: bool, caller: bool
) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test") if export else NoOpTracer()
    spans = DecisionSpans(tracer)
    parent = extract_parent({"traceparent": CALLER, "tracestate": "k=v"}) if caller else None
    span = spans.start(_record(), parent=parent)
    carrier: dict[str, str] = {}
    inject_context(span, carrier)
    fields = trace_fields(span)
    assert list(fields) == [(k.encode(), v.encode()) for k, v in carrier.items()]
    # export off: the caller's own context goes on, else nothing; on: a span of ours
    assert bool(fields) == (export or caller)
    if caller and not export:
        assert fields[0] == (b"traceparent", CALLER.encode())
