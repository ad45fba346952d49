"""The real sidecar on the production span pipeline (OTLP http/protobuf): what reaches the
collector, what the upstream is told, and the decision lines that must not be lost at exit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.otlp import SPAN_KIND_CLIENT, STATUS_ERROR, OtlpHttpReceiver, span_on
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer

WEB = "127.0.0.3"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def web() -> Iterator[UpstreamServer]:
    server = UpstreamServer(WEB, label="web").start()
    yield server
    server.stop()


@pytest.fixture
def otlp() -> Iterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver()
    yield receiver
    receiver.stop()


def _start(tmp: Path, web: UpstreamServer, otlp: OtlpHttpReceiver) -> Sidecar:
    return start_sidecar(
        tmp,
        allowlist=f"allow:\n  - host: web.test\n    ports: [{web.port}]\n",
        hosts={"web.test": WEB, "denied.test": WEB},
        args=["--allow-private-range", "127.0.0.0/8"],
        env={**otlp.exporter_env, "OTEL_SERVICE_NAME": "lean-e2e"},
    )


def test_plain_http_spans_continue_the_callers_trace(
    tmp_path: Path, web: UpstreamServer, otlp: OtlpHttpReceiver
) -> None:
    sidecar = _start(tmp_path, web, otlp)
    try:
        r = httpx.get(
            f"http://web.test:{web.port}/get",
            headers={
                "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01",
                "tracestate": "vendor=abc,other=1",
            },
            proxy=sidecar.proxy_url,
            timeout=10,
        )
        assert r.status_code == 200
        seen = r.json()["headers"]
        denied = httpx.get(f"http://denied.test:{web.port}/", proxy=sidecar.proxy_url, timeout=10)
        assert denied.status_code == 403
        (span,) = otlp.sink.wait_for(lambda s: s.trace_id == TRACE_ID)
        (deny,) = otlp.sink.wait_for(span_on("denied.test", "GET"))
        reload = otlp.sink.wait_for(lambda s: s.name == "policy reload")[0]
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]
    # The caller's span is the parent; the upstream's traceparent names ours; tracestate kept.
    assert span.parent_span_id == CALLER_SPAN
    assert seen["traceparent"] == f"00-{TRACE_ID}-{span.span_id}-01"
    assert seen["tracestate"] == "vendor=abc,other=1"
    assert span.name == "GET" and span.kind == SPAN_KIND_CLIENT
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["egress.decision"] == "allow"
    assert span.resource["service.name"] == "lean-e2e"
    assert deny.status_code == STATUS_ERROR and deny.attributes["error.type"] == "egress_denied"
    assert deny.parent_span_id == ""
    assert reload.attributes["egress.policy.reload.result"] == "applied"
    assert not [line for line in sidecar.stderr if "Traceback" in line]


def test_the_last_decision_lines_are_written_before_exit(
    tmp_path: Path, web: UpstreamServer, otlp: OtlpHttpReceiver
) -> None:
    """Lines are flushed every ~20 ms; a SIGTERM right after a burst must not lose any."""
    sidecar = _start(tmp_path, web, otlp)
    try:
        with httpx.Client(proxy=sidecar.proxy_url, timeout=10) as client:
            for i in range(30):
                host = "denied.test" if i % 2 else "web.test"
                client.get(f"http://{host}:{web.port}/n{i}")
    finally:
        code = sidecar.stop()
        sidecar.proc.wait(10)
    assert code == 0, sidecar.stderr[-20:]
    deadline = time.monotonic() + 5  # the pump thread reads the pipe to its end
    while len(sidecar.decisions()) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    urls = [d.get("url", "") for d in sidecar.decisions()]
    assert [u.rsplit("/", 1)[-1] for u in urls[-30:]] == [f"n{i}" for i in range(30)]
    # And every one of their spans reached the collector by the final flush.
    assert len([s for s in otlp.sink.spans if s.name == "GET"]) == 30
