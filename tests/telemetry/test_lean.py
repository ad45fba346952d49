"""The lean span pipeline (production: OTLP http/protobuf) against real HTTP receivers."""

from __future__ import annotations

import gzip
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.sdk.trace.sampling import Decision as SamplingDecision
from opentelemetry.trace import set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.metrics import Metrics
from sidecar.policy.errors import Problem
from sidecar.policy.model import Decision, Reason, Verdict
from sidecar.record import Capture, DecisionRecord
from sidecar.sources.reporting import Rejection, ReloadReporter
from sidecar.telemetry.lean import LeanTracerProvider, lean_settings
from sidecar.telemetry.sampling import DecisionSampler
from sidecar.telemetry.setup import build_tracer_provider
from sidecar.telemetry.spans import DecisionSpans, extract_parent, inject_context, trace_fields
from tests.support.faults import Blackhole
from tests.support.sidecar import free_port
from tests.support.tls import TestCA

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    request: ExportTraceServiceRequest


@dataclass
class Receiver:
    """Records every POST; answers with the statuses in ``answers`` first, then 200."""

    server: ThreadingHTTPServer
    posts: list[Post] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        scheme = "https" if isinstance(self.server.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[PbSpan, dict[str, Any], str]]:
        """(span, resource attributes, scope name) of everything accepted."""
        out = []
        with self.cond:
            for post in self.posts:
                for rs in post.request.resource_spans:
                    resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        out += [(s, resource, ss.scope.name) for s in ss.spans]
        return out

    def wait_spans(self, count: int, timeout: float = 10.0) -> list[PbSpan]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.spans()) < count and time.monotonic() < deadline:
                self.cond.wait(0.1)
        return [s for s, _, _ in self.spans()]


def _serve(tls: ssl.SSLContext | None = None, *, close_each: bool = False) -> Receiver:
    """``close_each``: the connection is closed after each answer, which does not say so (a
    collector restarted, an idle timeout): the exporter finds it closed on its next POST."""
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            rec = holder[0]
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with rec.cond:
                status = rec.answers.pop(0) if rec.answers else 200
                if status == 200:
                    if self.headers.get("content-encoding") == "gzip":
                        body = gzip.decompress(body)
                    rec.posts.append(
                        Post(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            ExportTraceServiceRequest.FromString(body),
                        )
                    )
                rec.cond.notify_all()
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
            if close_each:
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    holder.append(Receiver(server))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return holder[0]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = _serve()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "POD_NAME": "web-5d8-x2",
        "EGRESS_WORKLOAD_NAME": "web",
        **extra,
    }


def _lean(env: dict[str, str]) -> LeanTracerProvider:
    provider, _ = build_tracer_provider(env)
    assert isinstance(provider, LeanTracerProvider)
    return provider


def _record(verdict: Verdict = Verdict.ALLOW, **fields: object) -> DecisionRecord:
    reason = Reason.MATCHED_ALLOW if verdict is not Verdict.DENY else Reason.NO_MATCH
    rec = DecisionRecord(
        decision=Decision(verdict, reason, "web.test" if verdict is Verdict.ALLOW else None),
        capture=Capture.EXPLICIT,
        protocol="GET",
        host="web.test",
        port=80,
        policy_source="file:x",
        policy_version="sha256:abc",
        mode="enforce",
        peer_address="127.0.0.3",
        client_address="127.0.0.1",
        method="GET",
        url="http://web.test/x",
    )
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


# -- which pipeline -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "lean"),
    [
        ({}, True),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, True),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),
        ({"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/c.pem"}, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": "/k.pem"}, False),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"}, False),
    ],
)
def test_only_the_production_configuration_takes_the_lean_pipeline(
    extra: dict[str, str], lean: bool
) -> None:
    provider, _ = build_tracer_provider(_env("http://127.0.0.1:4318", **extra))
    assert isinstance(provider, LeanTracerProvider | TracerProvider)
    try:
        assert isinstance(provider, LeanTracerProvider) is lean
    finally:
        provider.shutdown()


def test_trace_file_and_console_keep_the_sdk(tmp_path: Path) -> None:
    env = _env("http://127.0.0.1:4318")
    for kwargs in ({"file": tmp_path / "s.jsonl"}, {"console": True}):
        provider, _ = build_tracer_provider(env, **kwargs)
        assert isinstance(provider, TracerProvider)
        provider.shutdown()


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c/otlp"}, "http://c:80/otlp/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c"}, "https://c:443/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/custom"}, "http://c:1/custom"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1"}, "http://c:1/"),
    ],
)
def test_the_endpoint_variables_name_the_url_as_the_spec_says(
    env: dict[str, str], url: str
) -> None:
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    settings = lean_settings(env, endpoint)
    assert settings is not None and settings.url == url


def test_timeout_headers_and_queue_variables_are_read() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
        "OTEL_EXPORTER_OTLP_HEADERS": "Api-Key=abc%3D,x-tenant = t1 ,broken",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "400",
        "OTEL_BSP_SCHEDULE_DELAY": "250",
    }
    s = lean_settings(env, "http://c:4318")
    assert s is not None
    assert s.timeout == 2.5
    assert s.headers == (("api-key", "abc="), ("x-tenant", "t1"))
    assert (s.max_queue, s.max_batch, s.delay) == (100, 100, 0.25)
    default = lean_settings({}, "http://c:4318")
    assert default is not None and (default.timeout, default.max_batch) == (10.0, 512)


# -- what the collector receives ----------------------------------------------------------------


def test_spans_carry_what_the_sdk_pipeline_would_have_sent(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same records through the SDK and the lean pipeline: same name, kind, attributes, status."""
    records = [
        _record(status_code=200),
        _record(status_code=200, url="http://web.test/y?q=1"),  # the same kind, another URL
        _record(status_code=200),  # the same again: its encoded attributes reused
        _record(Verdict.DENY, status_code=403),
        _record(status_code=502, error="[Errno 111] Connect call failed"),
        _record(status_code=502, error="[Errno 111] Connect call failed"),
        _record(Verdict.AUDIT, status_code=503, tls_passthrough=True),
        _record(status_code=404, peer_address=None),
        _record(status_code=None, peer_address=None),  # the client left before an answer
        _record(status_code=200, tls_inspected=True, protocol="POST", method="POST"),
        # CONNECT and transparent TLS: no method, no URL; by address, with the dialled one
        _record(status_code=200, protocol="CONNECT", method="CONNECT", url=None),
        _record(
            Verdict.DENY,
            protocol="TLS",
            method=None,
            url=None,
            host=None,
            capture=Capture.TRANSPARENT,
            original_address="198.18.0.7",
            peer_address=None,
            decision=Decision(Verdict.DENY, Reason.PRIVATE_ADDRESS, None, "198.18.0.7 is private"),
        ),
    ]
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = _lean(_env(receiver.endpoint, OTEL_EXPORTER_OTLP_HEADERS="x-tenant=t1"))
    spans = DecisionSpans(provider.get_tracer("egress-sidecar"))
    memory = InMemorySpanExporter()
    sdk = TracerProvider(sampler=DecisionSampler(ALWAYS_ON))
    sdk.add_span_processor(SimpleSpanProcessor(memory))
    reference = DecisionSpans(sdk.get_tracer("egress-sidecar"))
    for rec in records:
        spans.finish(spans.start(rec), rec)
        reference.finish(reference.start(rec), rec)
    provider.shutdown()
    got = receiver.spans()
    assert len(got) == len(records)
    for (span, resource, scope), want in zip(got, memory.get_finished_spans(), strict=True):
        assert resource["service.name"] == "web"  # pod_resource(env): the pod's identity
        assert resource["k8s.pod.name"] == "web-5d8-x2"
        assert resource["telemetry.sdk.language"] == "python"
        assert scope == "egress-sidecar"
        assert span.name == want.name
        assert span.kind == want.kind.value + 1
        assert {a.key: _value(a.value) for a in span.attributes} == dict(want.attributes or {})
        assert span.status.code == want.status.status_code.value
        assert span.status.message == (want.status.description or "")
        assert span.parent_span_id == b"" and span.flags == 0x100
        assert 0 < span.end_time_unix_nano - span.start_time_unix_nano < 10**9
    (post,) = receiver.posts
    assert post.path == "/v1/traces"
    assert post.headers["x-tenant"] == "t1"
    assert post.headers["content-type"] == "application/x-protobuf"


def test_gzip_compression(receiver: Receiver) -> None:
    provider = _lean(_env(receiver.endpoint, OTEL_EXPORTER_OTLP_COMPRESSION="gzip"))
    DecisionSpans(provider.get_tracer("t")).record(_record())
    provider.shutdown()
    (post,) = receiver.posts
    assert post.headers["content-encoding"] == "gzip"
    assert len(receiver.spans()) == 1


def test_a_rejected_reload_span_keeps_its_events(receiver: Receiver) -> None:
    provider = _lean(_env(receiver.endpoint))
    reporter = ReloadReporter(Metrics(), tracer_provider=provider)
    rejection = Rejection("file:x", "v2", (Problem(3, 5, "bad wildcard"),), keeping="v1")
    reporter.rejected(rejection)
    reporter.rejected(rejection, ValueError("boom"))
    reporter.applied("file:x", "v3", previous="v1", rules=2)
    provider.shutdown()
    failed, raised, applied = (s for s, _, _ in receiver.spans())
    assert failed.name == "policy reload" and failed.status.code == 2
    assert failed.status.message == "allowlist rejected"
    assert [e.name for e in failed.events] == ["exception", "allowlist.problem"]
    problem = {a.key: _value(a.value) for a in failed.events[1].attributes}
    assert problem == {"message": "bad wildcard", "line": 3, "column": 5}
    exception = {a.key: _value(a.value) for a in raised.events[0].attributes}
    assert exception["exception.type"] == "ValueError"
    assert exception["exception.message"] == "boom"
    assert applied.status.code == 0 and list(applied.events) == []


# -- propagation ----------------------------------------------------------------------------------


def test_the_callers_traceparent_is_the_parent_and_the_upstream_gets_ours(
    receiver: Receiver,
) -> None:
    provider = _lean(_env(receiver.endpoint))
    spans = DecisionSpans(provider.get_tracer("egress-sidecar"))
    incoming = {
        "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01",
        "tracestate": "vendor=abc,other=1",
    }
    rec = _record(status_code=200)
    span = spans.start(rec, parent=extract_parent(incoming))
    outgoing = dict(incoming)
    inject_context(span, outgoing)
    spans.finish(span, rec)
    provider.shutdown()
    (got,) = [s for s, _, _ in receiver.spans()]
    assert got.trace_id.hex() == TRACE_ID
    assert got.parent_span_id.hex() == CALLER_SPAN
    assert got.trace_state == "vendor=abc,other=1"
    assert got.flags == 0x300  # the parent is remote
    assert outgoing["traceparent"] == f"00-{TRACE_ID}-{got.span_id.hex()}-01"
    assert outgoing["tracestate"] == "vendor=abc,other=1"


def test_without_a_caller_each_span_starts_its_own_trace(receiver: Receiver) -> None:
    provider = _lean(_env(receiver.endpoint))
    spans = DecisionSpans(provider.get_tracer("egress-sidecar"))
    for _ in range(3):
        spans.record(_record())
    provider.shutdown()
    got = [s for s, _, _ in receiver.spans()]
    assert len({s.trace_id for s in got}) == 3 and all(len(s.trace_id) == 16 for s in got)


@pytest.mark.parametrize("pipeline", ["lean", "sdk"])
def test_a_decision_span_without_a_caller_is_a_root_whatever_span_is_current(
    receiver: Receiver, pipeline: str
) -> None:
    # The app's trace context is the only parent a decision has: not a span that happens to be
    # current where it is reported (a reload's, a second tier's), in either pipeline.
    sdk_exporter = InMemorySpanExporter()
    if pipeline == "lean":
        provider: Any = _lean(_env(receiver.endpoint))
    else:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(sdk_exporter))
    tracer = provider.get_tracer("egress-sidecar")
    spans = DecisionSpans(tracer)
    with tracer.start_as_current_span("ambient") as ambient:
        spans.record(_record())
        child = DecisionSpans(tracer).start(_record(), parent=extract_parent({}))
    provider.shutdown()
    ambient_ids = (ambient.get_span_context().trace_id, ambient.get_span_context().span_id)
    if pipeline == "lean":
        got = {
            s.name: (int.from_bytes(s.trace_id), s.parent_span_id) for s, _, _ in receiver.spans()
        }
        decision = got["GET"]
        assert decision[0] != ambient_ids[0] and decision[1] == b""
    else:
        (decision_span, _) = sdk_exporter.get_finished_spans()
        assert decision_span.parent is None
        assert decision_span.context.trace_id != ambient_ids[0]
    assert child.get_span_context().trace_id != ambient_ids[0]


# -- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "arg", "parent_flags", "exported"),
    [
        ("always_on", None, None, {"allow", "deny", "audit"}),
        ("always_off", None, None, {"deny", "audit"}),
        ("traceidratio", "0", None, {"deny", "audit"}),
        ("traceidratio", "1", None, {"allow", "deny", "audit"}),
        ("parentbased_always_on", None, "00", {"deny", "audit"}),
        ("parentbased_always_on", None, "01", {"allow", "deny", "audit"}),
        ("parentbased_always_off", None, None, {"deny", "audit"}),
    ],
)
def test_sampler_variables_and_denials_always_kept(
    receiver: Receiver, sampler: str, arg: str | None, parent_flags: str | None, exported: set[str]
) -> None:
    extra = {"OTEL_TRACES_SAMPLER": sampler}
    if arg is not None:
        extra["OTEL_TRACES_SAMPLER_ARG"] = arg
    with pytest.MonkeyPatch.context() as mp:
        # The SDK reads the sampler variables from os.environ.
        for key, value in extra.items():
            mp.setenv(key, value)
        provider = _lean(_env(receiver.endpoint))
    spans = DecisionSpans(provider.get_tracer("egress-sidecar"))
    headers: list[dict[str, str]] = []
    for verdict in (Verdict.ALLOW, Verdict.DENY, Verdict.AUDIT):
        parent = None
        if parent_flags is not None:
            parent = extract_parent({"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-{parent_flags}"})
        rec = _record(verdict)
        span = spans.start(rec, parent=parent)
        out: dict[str, str] = {}
        inject_context(span, out)
        headers.append(out)
        spans.finish(span, rec)
    provider.shutdown()
    got = {
        _value(a.value)
        for s, _, _ in receiver.spans()
        for a in s.attributes
        if a.key == "egress.decision"
    }
    assert got == exported
    # Sampled or not, the upstream is told whether this trace is sampled.
    for decision, out in zip(("allow", "deny", "audit"), headers, strict=True):
        assert out["traceparent"].endswith("-01" if decision in exported else "-00")


class _RecordOnly(Sampler):
    """Recorded, never sampled: the one case whose traceparent flags a lean span writes as 00."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(SamplingDecision.RECORD_ONLY)

    def get_description(self) -> str:
        return "record only"


@pytest.mark.parametrize(
    ("sampler", "parent_flags", "tracestate", "verdict"),
    [
        ("parentbased_always_on", None, None, Verdict.ALLOW),
        ("parentbased_always_on", "01", None, Verdict.ALLOW),
        ("parentbased_always_on", "01", "vendor=abc,other=1", Verdict.ALLOW),
        ("parentbased_always_on", "00", "vendor=abc", Verdict.DENY),  # kept: a denial
        ("parentbased_always_on", "00", None, Verdict.ALLOW),  # not recorded: the API's span
        ("always_off", None, None, Verdict.DENY),
        ("record_only", None, None, Verdict.ALLOW),
        ("record_only", "01", "vendor=abc", Verdict.ALLOW),
    ],
)
def test_a_lean_span_writes_the_headers_the_w3c_propagator_writes(
    receiver: Receiver,
    sampler: str,
    parent_flags: str | None,
    tracestate: str | None,
    verdict: Verdict,
) -> None:
    # inject_context takes the lean span's own shortcut; the propagator goes through a Context.
    env = _env(receiver.endpoint)
    if sampler == "record_only":
        settings = lean_settings(env, receiver.endpoint)
        assert settings is not None
        provider = LeanTracerProvider(settings, {"service.name": "t"}, _RecordOnly())
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OTEL_TRACES_SAMPLER", sampler)
            provider = _lean(env)
    spans = DecisionSpans(provider.get_tracer("egress-sidecar"))
    incoming: dict[str, str] = {}
    if parent_flags is not None:
        incoming["traceparent"] = f"00-{TRACE_ID}-{CALLER_SPAN}-{parent_flags}"
        if tracestate is not None:
            incoming["tracestate"] = tracestate
    rec = _record(verdict)
    span = spans.start(rec, parent=extract_parent(incoming) if incoming else None)
    ours: dict[str, str] = {}
    inject_context(span, ours)
    reference: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(reference, context=set_span_in_context(span))
    fields = trace_fields(span)
    spans.finish(span, rec)
    provider.shutdown()
    assert ours == reference
    assert list(fields) == [(k.encode(), v.encode()) for k, v in reference.items()]
    assert ours["traceparent"].split("-")[2] != CALLER_SPAN  # it names our span, not the caller's


def test_a_full_batch_leaves_at_once_and_the_rest_waits_for_the_next_one_or_the_delay(
    receiver: Receiver,
) -> None:
    # Stragglers sent with each full batch made a busy sidecar POST batches of ~150, not 512.
    provider = _lean(
        _env(receiver.endpoint, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4", OTEL_BSP_SCHEDULE_DELAY="1500")
    )
    spans = DecisionSpans(provider.get_tracer("t"))
    started = time.monotonic()
    for _ in range(6):
        spans.record(_record())
    assert len(receiver.wait_spans(4, timeout=1.0)) == 4
    time.sleep(0.3)
    assert [len(p.request.resource_spans[0].scope_spans[0].spans) for p in receiver.posts] == [4]
    assert len(receiver.wait_spans(6, timeout=5)) == 6  # the two left: when the delay passed
    assert time.monotonic() - started >= 1.0
    for _ in range(4):
        spans.record(_record())
    assert len(receiver.wait_spans(10, timeout=1.0)) == 10  # a full batch again: at once
    provider.shutdown()
    sizes = [len(p.request.resource_spans[0].scope_spans[0].spans) for p in receiver.posts]
    assert sizes == [4, 2, 4]


# -- failures -------------------------------------------------------------------------------------


def test_a_failing_collector_gets_the_batch_again_after_backoff(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers = [503, 429, 502]
    provider = _lean(_env(receiver.endpoint))
    spans = DecisionSpans(provider.get_tracer("t"))
    caplog.set_level(logging.INFO, "sidecar.telemetry.lean")
    for _ in range(5):
        spans.record(_record())
    # Backoff 1 s, 2 s, then delivered: well inside 10 s.
    assert len(receiver.wait_spans(5, timeout=10)) == 5
    provider.shutdown()
    assert len(receiver.spans()) == 5  # once each, not once per attempt
    failures = [r for r in caplog.records if r.getMessage().startswith("span export failed")]
    assert len(failures) == 1  # one line for the burst
    assert any(r.getMessage() == "span export recovered" for r in caplog.records)


def test_a_batch_the_collector_refuses_for_good_is_dropped_not_retried(
    receiver: Receiver,
) -> None:
    receiver.answers = [400]
    provider = _lean(_env(receiver.endpoint))
    spans = DecisionSpans(provider.get_tracer("t"))
    spans.record(_record())
    time.sleep(0.5)
    spans.record(_record())
    provider.shutdown()
    assert len(receiver.spans()) == 1
    assert provider.exporter.exported == 1


def test_a_connection_the_collector_closed_is_replaced_without_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = _serve(close_each=True)
    try:
        provider = _lean(_env(rec.endpoint))
        spans = DecisionSpans(provider.get_tracer("t"))
        caplog.set_level(logging.INFO, "sidecar.telemetry.lean")
        for batch in range(3):
            spans.record(_record())
            assert len(rec.wait_spans(batch + 1)) == batch + 1
            time.sleep(0.2)  # the server has closed the kept-alive connection by now
        provider.shutdown()
        assert provider.exporter.exported == 3
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        rec.server.shutdown()
        rec.server.server_close()


def test_headers_that_cannot_be_written_are_left_out_with_a_warning(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "sidecar.telemetry.lean")
    headers = "authorization=Bearer%20t0k,x-evil=a%0D%0Ax-injected: 1,bad name=v,x-ok=yes"
    provider = _lean(_env(receiver.endpoint, OTEL_EXPORTER_OTLP_HEADERS=headers))
    DecisionSpans(provider.get_tracer("t")).record(_record())
    provider.shutdown()
    (post,) = receiver.posts
    assert post.headers["authorization"] == "Bearer t0k"
    assert post.headers["x-ok"] == "yes"
    assert "x-evil" not in post.headers and "x-injected" not in post.headers
    left_out = [r for r in caplog.records if r.getMessage().startswith("OTLP header left out")]
    assert sorted(r.__dict__["header"] for r in left_out) == ["bad name", "x-evil"]


def test_a_full_queue_drops_counts_and_never_blocks() -> None:
    hole = Blackhole()
    try:
        provider = _lean(
            _env(
                hole.endpoint,
                OTEL_BSP_MAX_QUEUE_SIZE="50",
                OTEL_BSP_MAX_EXPORT_BATCH_SIZE="10",
                OTEL_EXPORTER_OTLP_TIMEOUT="1",
            )
        )
        metrics = Metrics()
        provider.count_drops(metrics.spans_dropped.inc)
        spans = DecisionSpans(provider.get_tracer("t"))
        rec = _record()
        worst = 0.0
        for _ in range(500):
            started = time.perf_counter()
            spans.record(rec)
            worst = max(worst, time.perf_counter() - started)
        assert worst < 0.05, worst  # a request never waits for the collector
        dropped = provider.exporter.dropped
        assert dropped >= 500 - 50 - 10
        assert metrics.registry.get_sample_value("egress_trace_spans_dropped_total") == dropped
        started = time.monotonic()
        provider.shutdown()
        # One try of the held batch (1 s timeout), then it gives up: bounded.
        assert time.monotonic() - started < 5
    finally:
        hole.stop()


def test_an_absent_collector_costs_the_request_path_nothing() -> None:
    provider = _lean(_env(f"http://127.0.0.1:{free_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="1"))
    spans = DecisionSpans(provider.get_tracer("t"))
    for _ in range(200):
        spans.record(_record())
    started = time.monotonic()
    provider.shutdown()
    assert time.monotonic() - started < 3
    assert provider.exporter.exported == 0


def test_https_collector_verified_with_the_certificate_variable(tmp_path: Path) -> None:
    ca = TestCA()
    cert, key = ca.issue("127.0.0.1").write(tmp_path, "collector")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    rec = _serve(tls)
    try:
        trusted = _lean(
            _env(rec.endpoint, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.write_ca(tmp_path / "ca.pem")))
        )
        DecisionSpans(trusted.get_tracer("t")).record(_record())
        trusted.shutdown()
        assert len(rec.spans()) == 1
        # Without the CA the collector is not trusted: nothing is sent, nothing breaks.
        untrusted = _lean(_env(rec.endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="2"))
        DecisionSpans(untrusted.get_tracer("t")).record(_record())
        untrusted.shutdown()
        assert len(rec.spans()) == 1 and untrusted.exporter.exported == 0
    finally:
        rec.server.shutdown()
        rec.server.server_close()
