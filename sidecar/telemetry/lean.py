"""The production span pipeline (OTLP http/protobuf): OpenTelemetry API objects, no SDK.

Why not the SDK here: issue 9 allows span export 1.3x the CPU of no export. Measured on the
same (busy, 2-core) machine, per decision span: the SDK's start_span + end ~98 us on the request
path (BoundedAttributes, locks, span processors, ReadableSpan snapshots) against ~11 us here, and
its OTLP encoder ~206 us in the export thread against ~17 us for otlp_wire. These
classes implement the *API* (TracerProvider, Tracer, Span), so DecisionSpans, the reload
reporter and the W3C propagator work with them unchanged, and keep only what an egress span
needs: attributes, events, status, sampling as the SDK would decide it (the same DecisionSampler
and OTEL_TRACES_SAMPLER objects), the pod's resource.

Export: an ended, sampled span is encoded (sidecar.telemetry.otlp_wire) and its bytes go into
a bounded deque (a full queue drops the span, counts it and logs at most once per 10 s); one
daemon thread sends them in batches of OTEL_BSP_MAX_EXPORT_BATCH_SIZE (default 512) as they
fill, and whatever is queued when OTEL_BSP_SCHEDULE_DELAY (default 1 s) passes without one,
each POSTed over one keep-alive connection (sidecar.telemetry.collector). A batch that fails
(refused, timeout, 429, 5xx) is kept and retried on a later round with exponential backoff,
while new spans wait in the bounded queue; one log line per failure burst.
Nothing on the request path ever waits for the network.

Configurations this does not cover keep the SDK pipeline (sidecar.telemetry.setup decides):
gRPC, --trace-file, --trace-console, client certificates, compression other than gzip.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from random import getrandbits
from urllib.parse import unquote, urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Decision, Sampler
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.span import TraceState
from opentelemetry.util import types

from sidecar.telemetry import otlp_wire
from sidecar.telemetry.collector import CollectorConnection, CollectorProtocolError, valid_field
from sidecar.telemetry.sampling import ALWAYS_KEPT, DecisionSampler, always_kept

log = logging.getLogger(__name__)

# The OTLP proto's span flags: "has is_remote" always, "is remote" when the parent came from a
# caller's traceparent (what the SDK's encoder writes).
_CLIENT = SpanKind.CLIENT.value + 1  # OTLP's enum (the API's + 1)
_UNSAMPLED = TraceFlags(0)
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200

DROP_LOG_INTERVAL_S = 10.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 32.0


@dataclass(frozen=True)
class OtlpHttpSettings:
    """Where and how to POST, from the OTEL_EXPORTER_OTLP_* variables."""

    scheme: str  # http or https
    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...]
    timeout: float  # seconds, per socket operation
    gzip: bool
    certificate: str | None  # CA bundle for https
    max_queue: int
    max_batch: int
    delay: float  # seconds between rounds

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def _var(env: Mapping[str, str], name: str) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
    value = env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")
    return value.strip() if value else None


def _headers(text: str | None) -> tuple[tuple[str, str], ...]:
    # W3C baggage-like "k1=v1,k2=v2", percent-encoded (the SDK's parse_env_headers). A field
    # that cannot be written as it is (a name not a token, a CR or LF decoded into a value) is
    # left out with a warning, as the SDK leaves out what it cannot parse.
    out = []
    for item in (text or "").split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            field = (unquote(name).strip().lower(), unquote(value).strip())
            if valid_field(*field):
                out.append(field)
            else:
                log.warning(
                    "OTLP header left out: not a valid HTTP field",
                    extra={"variable": "OTEL_EXPORTER_OTLP_HEADERS", "header": field[0][:64]},
                )
    return tuple(out)


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


def lean_settings(env: Mapping[str, str], endpoint: str) -> OtlpHttpSettings | None:
    """The lean exporter's settings, or None when the SDK pipeline must handle this env."""
    if _var(env, "CLIENT_CERTIFICATE") or _var(env, "CLIENT_KEY"):
        return None  # mutual TLS: the SDK exporter's handling stays the reference
    compression = (_var(env, "COMPRESSION") or "none").lower()
    if compression not in ("none", "gzip"):
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    url = urlsplit(endpoint.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        return None
    path = url.path or "/"
    if not traces_endpoint:
        # The generic endpoint is a base: the signal's path is appended, as the spec says.
        path = path + ("v1/traces" if path.endswith("/") else "/v1/traces")
    if url.query:
        path += "?" + url.query
    try:
        timeout = float(_var(env, "TIMEOUT") or 10)
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return None
    max_queue = _positive_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    max_batch = min(_positive_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), max_queue)
    delay_ms = _positive_int(env, "OTEL_BSP_SCHEDULE_DELAY", 1000)
    return OtlpHttpSettings(
        scheme=url.scheme,
        host=url.hostname,
        port=port,
        path=path,
        headers=_headers(_var(env, "HEADERS")),
        timeout=timeout if timeout > 0 else 10.0,
        gzip=compression == "gzip",
        certificate=_var(env, "CERTIFICATE"),
        max_queue=max_queue,
        max_batch=max_batch,
        delay=delay_ms / 1000,
    )


class LeanEvent:
    __slots__ = ("attributes", "name", "timestamp")

    def __init__(self, name: str, attributes: Mapping[str, object], timestamp: int) -> None:
        self.name = name
        self.attributes = attributes
        self.timestamp = timestamp


class LeanSpan(trace.Span):
    """A recording span: plain fields, handed to the exporter's queue when it ends."""

    __slots__ = (
        "_context",
        "_ended",
        "_sampled",
        "_sink",
        "_trace_state",
        "attributes",
        "block",
        "deferred",
        "end_ns",
        "events",
        "flags",
        "kind",
        "name",
        "parent_span_id",
        "scope",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_id",
        "trace_state",
        "url_full",
    )

    def __init__(  # noqa: PLR0917 (one constructor call per span, positional for speed)
        self,
        name: str,
        kind: int,
        trace_id: int,
        span_id: int,
        parent_span_id: int,
        remote_parent: bool,
        trace_state: TraceState | None,
        attributes: dict[str, object],
        start_ns: int,
        scope: bytes,
        sampled: bool,
        sink: Callable[[LeanSpan], None] | None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self._trace_state = trace_state
        self.trace_state = trace_state.to_header() if trace_state else ""
        self.attributes = attributes
        # Attribute fields already encoded (OTLP KeyValues), sent before ``attributes``: a
        # decision span's, shared by every decision of its kind (DecisionSpans.finish).
        self.block = b""
        # A decision span whose attributes DecisionSpans.finish writes (start_decision).
        self.deferred = False
        self.url_full = ""  # its url.full, encoded apart (unique per call: never cached)
        self.start_ns = start_ns
        self.end_ns = 0
        self.scope = scope
        self.events: list[LeanEvent] | None = None
        self.status_code = 0
        self.status_message: str | None = None
        self.flags = _FLAGS_HAS_IS_REMOTE | (_FLAGS_IS_REMOTE if remote_parent else 0)
        self._sampled = sampled
        self._sink = sink
        self._ended = False
        self._context: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        # Built on demand: only the propagator asks (plain HTTP), and a SpanContext costs.
        if self._context is None:
            self._context = SpanContext(
                self.trace_id,
                self.span_id,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if self._sampled else 0),
                trace_state=self._trace_state,
            )
        return self._context

    def w3c_headers(self, headers: MutableMapping[str, str]) -> None:
        """traceparent and tracestate naming this span, as the W3C propagator writes them,
        from the fields at hand: through a SpanContext they cost ~5 us a request more."""
        for name, value in self.w3c_fields():
            headers[name.decode()] = value.decode("latin-1")

    def w3c_fields(self) -> list[tuple[bytes, bytes]]:
        """w3c_headers' fields as header bytes (the fast path's request heads are bytes; a
        tracestate is printable ASCII, as TraceState checks)."""
        fields = [
            (
                b"traceparent",
                b"00-%032x-%016x-%s"
                % (self.trace_id, self.span_id, b"01" if self._sampled else b"00"),
            )
        ]
        if self.trace_state:
            fields.append((b"tracestate", self.trace_state.encode("latin-1", "replace")))
        return fields

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if not self._ended:
            self.attributes.update(attributes)

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if not self._ended:
            self.attributes[key] = value

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._ended:
            return
        if self.events is None:
            self.events = []
        self.events.append(LeanEvent(name, dict(attributes or {}), timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Links are not exported by this pipeline (no egress span has any)."""

    def update_name(self, name: str) -> None:
        if not self._ended:
            self.name = name

    def is_recording(self) -> bool:
        return not self._ended

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self.status_code == StatusCode.OK.value:
            return  # the SDK's rule: OK is final
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        self.status_code = code.value
        # A description only goes with ERROR (the API's Status drops it otherwise).
        self.status_message = description if code is StatusCode.ERROR else None

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        attrs: dict[str, object] = {
            "exception.type": type(exception).__name__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)  # type: ignore[arg-type]

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.end_ns = end_time or time.time_ns()
        if self._sink is not None:
            self._sink(self)


class LeanTracer(trace.Tracer):
    def __init__(self, provider: LeanTracerProvider, scope: bytes) -> None:
        self._sampler = provider.sampler
        # The default sampler (OTEL_TRACES_SAMPLER unset: parentbased_always_on) decided inline:
        # through the SDK's objects it is three samplers, three context look-ups and a
        # SamplingResult per span (~4 us); test_lean checks both give the same decisions.
        self._default_sampling = (
            isinstance(provider.sampler, DecisionSampler)
            and provider.sampler.delegate is DEFAULT_ON
        )
        self._sink = provider.exporter.enqueue
        self._scope = scope

    span_type = LeanSpan  # what start_decision returns when it records

    @property
    def inline_sampling(self) -> bool:
        """The default sampler, decided here (start_decision's precondition)."""
        return self._default_sampling

    def _parent(self, context: Context | None) -> tuple[int, int, bool, bool, TraceState | None]:
        """The new span's trace id, parent span id, whether that parent is remote, whether it
        was sampled (a root: as parentbased_always_on samples it) and its trace state."""
        parent = trace.get_current_span(context).get_span_context()
        if parent.trace_id != INVALID_TRACE_ID and parent.span_id != INVALID_SPAN_ID:
            return (
                parent.trace_id,
                parent.span_id,
                parent.is_remote,
                parent.trace_flags.sampled,
                parent.trace_state,
            )
        return getrandbits(128) or 1, 0, False, True, None

    def start_decision(
        self, name: str, context: Context | None, start_ns: int | None, verdict: str
    ) -> trace.Span:
        """A decision's CLIENT span under the default sampler, without attributes yet:
        DecisionSpans.finish writes them from the record (encoded once per kind of decision),
        so no attribute dict is built per call. ``verdict``: its egress.decision (a denial or
        an audit is sampled whatever the parent says, as always_kept reads it)."""
        if context is None:  # a root: not the ambient context's span (DecisionSpans.start)
            trace_id, parent_id, remote, parent_sampled, trace_state = (
                getrandbits(128) or 1,
                0,
                False,
                True,
                None,
            )
        else:
            trace_id, parent_id, remote, parent_sampled, trace_state = self._parent(context)
        span_id = getrandbits(64) or 1
        if not (parent_sampled or verdict in ALWAYS_KEPT):
            return NonRecordingSpan(
                SpanContext(
                    trace_id,
                    span_id,
                    is_remote=False,
                    trace_flags=_UNSAMPLED,
                    trace_state=trace_state,
                )
            )
        span = LeanSpan(
            name,
            _CLIENT,
            trace_id,
            span_id,
            parent_id,
            remote,
            trace_state,
            {},
            start_ns or time.time_ns(),
            self._scope,
            True,
            self._sink,
        )
        span.deferred = True
        return span

    def start_span(  # noqa: PLR0917 (the API's signature)
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        trace_id, parent_id, remote, parent_sampled, trace_state = self._parent(context)
        span_id = getrandbits(64) or 1
        if self._default_sampling:
            sampled = recording = parent_sampled or always_kept(attributes)
            attrs: dict[str, object] = dict(attributes) if attributes else {}
        else:
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            recording = result.decision is not Decision.DROP
            trace_state = result.trace_state
            attrs = dict(result.attributes)
        if not recording:
            return NonRecordingSpan(
                SpanContext(
                    trace_id,
                    span_id,
                    is_remote=False,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0),
                    trace_state=trace_state,
                )
            )
        return LeanSpan(
            name,
            kind.value + 1,  # the API's enum starts at INTERNAL=0, OTLP's at UNSPECIFIED=0
            trace_id,
            span_id,
            parent_id,
            remote,
            trace_state,
            attrs,
            start_time or time.time_ns(),
            self._scope,
            sampled,
            self._sink if sampled else None,  # RECORD_ONLY: recorded, never exported
        )

    @contextmanager
    def start_as_current_span(  # type: ignore[override]  # noqa: PLR0917
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class LeanExporter:
    """The bounded queue and the thread that drains it to the collector."""

    def __init__(self, settings: OtlpHttpSettings, resource: bytes) -> None:
        self.settings = settings
        self._resource = resource
        # Ended spans, encoded: (scope, Span message). See enqueue.
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one export at a time: the worker's or a force_flush
        self._stopping = False
        self._conn = CollectorConnection(
            settings.scheme,
            settings.host,
            settings.port,
            settings.path,
            settings.headers,
            settings.timeout,
            settings.certificate,
        )
        self._retry: tuple[bytes, int] | None = None  # a failed batch: body, span count
        self._backoff = 0.0
        self._next_try = 0.0
        self._failing = False
        self.dropped = 0
        self.exported = 0
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        self.on_drop: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    # -- request path -------------------------------------------------------------------------

    def enqueue(self, span: LeanSpan) -> None:
        queue = self._queue
        if self._stopping:
            self.dropped += 1  # ended after shutdown: counted, not logged (the process is exiting)
            return
        if len(queue) >= self.settings.max_queue:
            self._drop()
            return
        # Encoded here, as it ends, and freed: the queue holds bytes. Queued as objects, 512+
        # spans of six objects each kept the cyclic GC busy (256 young collections in a 10 s
        # load, 28 without export; 12 now) and were read back cold by the export thread. The
        # encoding's instructions are the same on either thread.
        queue.append((span.scope, otlp_wire.encode_span(span)))
        if len(queue) == self.settings.max_batch:
            self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop()
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning(
                "span export queue full, dropping spans (collector slow or unreachable)",
                extra={"spans_dropped_total": self.dropped, "queue": self.settings.max_queue},
            )

    # -- export thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            # Woken by a full batch: only full batches leave now. What is left over goes with
            # the next one, or when the schedule delay passes with none. Sent at once, the
            # stragglers made ~150-span batches at 12k req/s instead of 512: three times the
            # POSTs, each costing the sidecar (and the collector) its fixed share.
            full = self._wake.wait(self.settings.delay)
            self._wake.clear()
            if self._stopping:
                break
            if time.monotonic() >= self._next_try:
                self._round(final=False, whole_batches=full)
        self._round(final=True)
        self._conn.close()

    def _take(self, whole_batches: bool) -> tuple[bytes, int] | None:
        if self._retry is not None:
            return self._retry
        queue = self._queue
        count = min(len(queue), self.settings.max_batch)
        if not count or (whole_batches and count < self.settings.max_batch):
            return None
        batch = [queue.popleft() for _ in range(count)]
        return otlp_wire.encode_batch(self._resource, batch), count

    def _round(self, *, final: bool, whole_batches: bool = False) -> bool:
        """Export what is queued (``whole_batches``: only full batches); stop at the first
        failure. True: nothing is left that this round would send."""
        with self._lock:
            while (item := self._take(whole_batches)) is not None:
                outcome = self._post(item[0], final=final)
                if outcome is None:  # retry later
                    self._retry = item
                    self._backoff = min(max(self._backoff * 2, BACKOFF_FIRST_S), BACKOFF_MAX_S)
                    self._next_try = time.monotonic() + self._backoff
                    return False
                self._retry = None
                if outcome:
                    self.exported += item[1]
                    self._backoff = 0.0
                    self._next_try = 0.0
            return True

    def _post(self, body: bytes, *, final: bool) -> bool | None:
        """True: accepted; False: rejected for good (dropped); None: retry later."""
        s = self.settings
        if s.gzip:
            body = gzip.compress(body, compresslevel=1)  # ~3x cheaper than 6, most of the gain
        # A kept-alive connection the collector closed meanwhile fails on first use: one more
        # try on a new connection before calling it a failure.
        for attempt in (0, 1):
            reused = self._conn.connected
            try:
                status = self._conn.post(body, gzipped=s.gzip)
                break
            except (OSError, CollectorProtocolError) as err:
                if reused and attempt == 0 and not isinstance(err, TimeoutError):
                    continue
                self._failed(f"{type(err).__name__}: {err}", final)
                return None
        if 200 <= status < 300:
            if self._failing:
                self._failing = False
                log.info("span export recovered", extra={"collector": s.url})
            return True
        if status == 429 or status >= 500:
            self._failed(f"HTTP {status}", final)
            return None
        # Any other answer will not change on a retry (a malformed batch, a bad header).
        log.warning(
            "span export rejected by the collector, batch dropped",
            extra={"collector": s.url, "status": status},
        )
        return False

    def _failed(self, why: str, final: bool) -> None:
        if not self._failing:
            self._failing = True  # one line per burst, not one per retry
            log.warning(
                "span export failed, retrying with backoff; spans wait in a bounded queue",
                extra={"collector": self.settings.url, "error": why, "final_flush": final},
            )

    # -- provider -----------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._queue) + (self._retry[1] if self._retry is not None else 0)

    def force_flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._round(final=True):
                return True
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.pending() == 0

    def shutdown(self) -> None:
        """Export what can be (one try per batch, stopping at the first failure), then stop."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        lost = self.pending()
        if lost:
            log.warning(
                "span export stopped with spans not delivered",
                extra={"collector": self.settings.url, "spans_lost": lost},
            )


class LeanTracerProvider(trace.TracerProvider):
    def __init__(
        self, settings: OtlpHttpSettings, resource: Mapping[str, object], sampler: Sampler
    ) -> None:
        self.sampler = sampler
        self.resource_attributes = dict(resource)
        self.exporter = LeanExporter(settings, otlp_wire.encode_resource(resource))
        self._tracers: dict[tuple[str, str | None], LeanTracer] = {}

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        key = (instrumenting_module_name, instrumenting_library_version)
        tracer = self._tracers.get(key)
        if tracer is None:
            scope = otlp_wire.encode_scope(*key)
            tracer = self._tracers[key] = LeanTracer(self, scope)
        return tracer

    def count_drops(self, increment: Callable[[], None]) -> None:
        """Call ``increment`` once per span dropped on a full queue (a metric's inc)."""
        self.exporter.on_drop = increment

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        self.exporter.shutdown()
