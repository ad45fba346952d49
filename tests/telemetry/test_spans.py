"""DecisionSpans.finish: the status code and error.type a failed call's span carries."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sidecar.telemetry.spans import DecisionSpans
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
