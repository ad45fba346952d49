"""Export planning from OTEL_* variables, the resource, and the decision sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision
from opentelemetry.trace import SpanKind

from sidecar.telemetry.sampling import DecisionSampler
from sidecar.telemetry.setup import ExportPlan, TelemetryConfigError, plan_export, pod_resource

EP = "http://collector:4318"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ExportPlan(None, None, False, None)),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ExportPlan(None, None, False, None)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": EP}, ExportPlan("http/protobuf", EP, False, None)),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": EP, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ExportPlan("grpc", EP, False, None),
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": EP + "/v1/traces"},
            ExportPlan("http/protobuf", EP + "/v1/traces", False, None),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": EP,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            ExportPlan("grpc", EP, False, None),
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": EP, "OTEL_TRACES_EXPORTER": "none"},
            ExportPlan(None, None, False, None),
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": EP, "OTEL_TRACES_EXPORTER": "console"},
            ExportPlan(None, None, True, None),
        ),
    ],
)
def test_plan_export_follows_the_otel_variables(env: dict[str, str], expected: ExportPlan) -> None:
    assert plan_export(env) == expected


def test_console_and_file_need_no_endpoint(tmp_path: Path) -> None:
    plan = plan_export({}, console=True, file=tmp_path / "s.jsonl")
    assert (plan.protocol, plan.console, plan.file) == (None, True, tmp_path / "s.jsonl")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": EP, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": EP, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": EP, "OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
    ],
)
def test_unusable_values_are_rejected_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(TelemetryConfigError, match=named):
        plan_export(env)


def test_pod_resource_names_the_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    attrs = pod_resource(
        {
            "POD_NAME": "web-5d8-x2",
            "POD_NAMESPACE": "shop",
            "NODE_NAME": "node-1",
            "EGRESS_WORKLOAD_KIND": "Deployment",
            "EGRESS_WORKLOAD_NAME": "web",
        }
    ).attributes
    assert attrs["service.name"] == "web"
    assert attrs["k8s.deployment.name"] == "web"
    assert attrs["k8s.pod.name"] == "web-5d8-x2"
    assert attrs["k8s.namespace.name"] == "shop"
    assert attrs["k8s.node.name"] == "node-1"


def test_otel_variables_win_over_derived_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-api")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=from-env")
    attrs = pod_resource({"POD_NAME": "p", "EGRESS_WORKLOAD_NAME": "web"}).attributes
    assert attrs["service.name"] == "checkout-api"
    assert attrs["k8s.pod.name"] == "from-env"


def test_without_identity_the_service_is_egress_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert pod_resource({}).attributes["service.name"] == "egress-sidecar"


@pytest.mark.parametrize(
    ("decision", "sampled"), [("deny", True), ("audit", True), ("allow", False), (None, False)]
)
def test_denials_and_audits_are_sampled_even_when_the_sampler_drops_everything(
    decision: str | None, sampled: bool
) -> None:
    sampler = DecisionSampler(ALWAYS_OFF)
    attrs = {"egress.decision": decision} if decision else {}
    result = sampler.should_sample(None, 0x1234, "GET", SpanKind.CLIENT, attrs)
    assert (result.decision is Decision.RECORD_AND_SAMPLE) is sampled


@pytest.mark.parametrize(
    ("result", "sampled"), [("invalid", True), ("deleted", True), ("applied", False)]
)
def test_rejected_and_deleted_policy_reloads_are_always_sampled(result: str, sampled: bool) -> None:
    sampler = DecisionSampler(ALWAYS_OFF)
    attrs = {"egress.policy.reload.result": result}
    outcome = sampler.should_sample(None, 0x1234, "policy reload", SpanKind.INTERNAL, attrs)
    assert (outcome.decision is Decision.RECORD_AND_SAMPLE) is sampled


def test_without_any_exporter_no_span_is_built_and_traceparent_is_left_alone() -> None:
    from opentelemetry.trace import NoOpTracerProvider

    from sidecar.telemetry.setup import build_tracer_provider
    from sidecar.telemetry.spans import extract_parent, inject_context

    provider, plan = build_tracer_provider({})
    assert isinstance(provider, NoOpTracerProvider)
    assert plan.protocol is None
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    span = provider.get_tracer("t").start_span("GET", context=extract_parent(incoming))
    headers = dict(incoming)
    inject_context(span, headers)
    assert headers == incoming


def test_with_an_endpoint_spans_are_recorded(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.telemetry.setup import build_tracer_provider

    provider, _ = build_tracer_provider({}, file=tmp_path / "s.jsonl")
    assert isinstance(provider, TracerProvider)
    span = provider.get_tracer("t").start_span("GET", attributes={"egress.decision": "allow"})
    assert span.is_recording()
    span.end()
    provider.shutdown()
    assert '"name":"GET"' in (tmp_path / "s.jsonl").read_text()


def test_trace_console_writes_spans_to_stderr_never_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.telemetry.setup import build_tracer_provider

    provider, plan = build_tracer_provider({}, console=True)
    assert isinstance(provider, TracerProvider) and plan.console
    provider.get_tracer("t").start_span("CONNECT", attributes={"egress.decision": "deny"}).end()
    provider.shutdown()
    out, err = capsys.readouterr()
    assert out == ""
    assert '"name": "CONNECT"' in err and '"egress.decision": "deny"' in err


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("[Errno 111] Connect call failed ('127.0.0.5', 43949)", "connection_refused"),
        ("Connection refused", "connection_refused"),
        ("connect timed out", "timeout"),
        ("[Errno 113] No route to host", "host_unreachable"),
        ("peer closed connection: [Errno 104] Connection reset by peer", "connection_reset"),
        ("something odd", "upstream_error"),
    ],
)
def test_upstream_errors_map_to_low_cardinality_error_types(message: str, category: str) -> None:
    from sidecar.telemetry.spans import error_type

    assert error_type(message) == category
