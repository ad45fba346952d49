"""Build the TracerProvider from the standard OTEL_* variables and the pod's identity.

The SDK's exporter classes do not read OTEL_EXPORTER_OTLP_PROTOCOL themselves (only the SDK's
auto-configuration does), so the protocol is chosen here. No endpoint configured means no OTLP
exporter at all: a sidecar without a collector must not spend time retrying one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace.sampling import _get_from_env_or_default
from opentelemetry.trace import NoOpTracerProvider

from sidecar import contract
from sidecar.telemetry.lean import LeanTracerProvider, lean_settings
from sidecar.telemetry.sampling import DecisionSampler

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")


class TelemetryConfigError(ValueError):
    """An OTEL_* variable holds a value we cannot use; the message names it."""


@dataclass(frozen=True)
class ExportPlan:
    protocol: str | None  # None: no OTLP export
    endpoint: str | None
    console: bool
    file: Path | None


def plan_export(
    env: Mapping[str, str], *, console: bool = False, file: Path | None = None
) -> ExportPlan:
    """Which exporters the environment asks for (pure, for tests and the startup log)."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter == "none" or not endpoint:
        return ExportPlan(None, None, console, file)
    if exporter not in ("otlp", "console"):
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={exporter!r}: only 'otlp', 'console' and 'none' are supported"
        )
    if exporter == "console":
        return ExportPlan(None, None, True, file)
    var = (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        else "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    # The OpenTelemetry specification's default is http/protobuf.
    protocol = env.get(var, "http/protobuf").strip().lower() or "http/protobuf"
    if protocol not in PROTOCOLS:
        raise TelemetryConfigError(
            f"{var}={protocol!r}: use one of {', '.join(PROTOCOLS)} (http/json is not supported)"
        )
    return ExportPlan(protocol, endpoint, console, file)


def pod_resource(env: Mapping[str, str]) -> Resource:
    """service.name and k8s.* attributes; anything set in OTEL_* variables wins."""
    defaults: dict[str, str] = {}
    workload = env.get(contract.ENV_WORKLOAD_NAME)
    kind = env.get(contract.ENV_WORKLOAD_KIND, "").lower()
    pod = env.get(contract.ENV_POD_NAME)
    defaults["service.name"] = workload or pod or "egress-sidecar"
    if pod:
        defaults["k8s.pod.name"] = pod
    if namespace := env.get(contract.ENV_POD_NAMESPACE):
        defaults["k8s.namespace.name"] = namespace
    if node := env.get(contract.ENV_NODE_NAME):
        defaults["k8s.node.name"] = node
    if workload and kind in ("deployment", "statefulset", "daemonset", "job", "cronjob"):
        defaults[f"k8s.{kind}.name"] = workload
    defaults["service.namespace"] = env.get(contract.ENV_POD_NAMESPACE, "") or "default"
    from_env = OTELResourceDetector().detect().attributes
    return Resource.create({k: v for k, v in defaults.items() if k not in from_env})


def _otlp_exporter(plan: ExportPlan, env: Mapping[str, str]) -> SpanExporter:
    # The exporters read their endpoint, headers, timeout, compression and TLS variables
    # themselves; HTTP appends v1/traces to OTEL_EXPORTER_OTLP_ENDPOINT, as the spec says.
    # Each protocol's exporter is imported only when chosen: the gRPC one loads grpc
    # (+13 MiB, measured).
    if plan.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    # The transport is the exporter's private hook (a keyword and a base class it may rename):
    # if either moves, its default transport (requests) still exports, ~6 MiB heavier.
    try:
        from sidecar.telemetry.transport import HttpClientTransport

        return HttpExporter(_transport=HttpClientTransport(**_tls_options(env)))
    except (ImportError, TypeError) as err:
        log.warning("OTLP/HTTP export through the exporter's default transport (requests): %s", err)
        return HttpExporter()


def _tls_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The certificate variables the exporter would read for its default transport."""

    def first(*names: str) -> str | None:
        return next((env[n] for n in names if env.get(n)), None)

    ca = first("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
    key = first("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY")
    cert = first(
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
    )
    return {
        "verify": ca or True,
        "cert": (cert, key) if cert and key else cert,
    }


def build_tracer_provider(
    env: Mapping[str, str] | None = None,
    *,
    console: bool = False,
    file: Path | None = None,
    on_drop: Callable[[], None] | None = None,
) -> tuple[TracerProvider | LeanTracerProvider | NoOpTracerProvider, ExportPlan]:
    """``on_drop`` is called once per span dropped because an export queue was full (the
    egress_trace_spans_dropped_total metric), whichever pipeline the variables choose."""
    env = os.environ if env is None else env
    plan = plan_export(env, console=console, file=file)
    if plan.protocol is None and not plan.console and plan.file is None:
        # Nothing would receive a span: don't build any (about 7 % of per-request CPU), and
        # leave the caller's traceparent untouched instead of naming spans that exist nowhere.
        return NoOpTracerProvider(), plan
    sampler = DecisionSampler(_get_from_env_or_default())
    if plan.protocol == "http/protobuf" and not plan.console and plan.file is None:
        # The production configuration: the lean pipeline (sidecar.telemetry.lean says why),
        # unless the variables ask for something only the SDK exporter does.
        assert plan.endpoint is not None
        settings = lean_settings(env, plan.endpoint)
        if settings is not None:
            lean = LeanTracerProvider(settings, pod_resource(env).attributes, sampler)
            if on_drop is not None:
                lean.count_drops(on_drop)
            return lean, plan
    # The SDK's pipeline is imported only by the configurations that use it.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    def batch(exporter: SpanExporter) -> BatchSpanProcessor:
        return BatchSpanProcessor(exporter) if on_drop is None else _counting(exporter, on_drop)

    provider = TracerProvider(resource=pod_resource(env), sampler=sampler)
    if plan.protocol is not None:
        provider.add_span_processor(batch(_otlp_exporter(plan, env)))
    if plan.file is not None:
        # Only with --trace-file: it loads protobuf's JSON formatting.
        from sidecar.telemetry.file_exporter import OtlpJsonLinesExporter

        provider.add_span_processor(batch(OtlpJsonLinesExporter(plan.file)))
    if plan.console:
        # stderr: stdout carries exactly one JSON line per decision and nothing else.
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    return provider, plan


def _counting(exporter: SpanExporter, on_drop: Callable[[], None]) -> BatchSpanProcessor:
    """The SDK's BatchSpanProcessor, telling ``on_drop`` of each span it drops on a full queue.

    The SDK only logs those drops (and records them in its own OTel metrics, off by default);
    its queue is private: if a release moves it, drops go uncounted (never an error)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    class CountingBatchSpanProcessor(BatchSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            if span.context is not None and span.context.trace_flags.sampled:
                inner = getattr(self, "_batch_processor", None)
                queue = getattr(inner, "_queue", None)
                limit = getattr(inner, "_max_queue_size", None)
                if queue is not None and limit is not None and len(queue) >= limit:
                    on_drop()
            super().on_end(span)

    return CountingBatchSpanProcessor(exporter)
