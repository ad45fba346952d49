"""OTLP/HTTP export through the sidecar's http.client transport, to a real receiver: spans
arrive (plain and gzip), one connection carries successive exports, a collector that went away
and came back gets the next batch, and refusals are left to the exporter's retry logic."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from sidecar.telemetry.setup import build_tracer_provider
from sidecar.telemetry.transport import HttpClientTransport
from tests.support.otlp import OtlpHttpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    r = OtlpHttpReceiver()
    yield r
    r.stop()


def _provider(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> TracerProvider:
    # The exporter reads its endpoint and options from os.environ itself.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # With the console exporter too: the SDK pipeline (OTLP/HTTP alone takes the lean one, which
    # has its own transport; sidecar.telemetry.lean), whose exporter this transport serves.
    provider, plan = build_tracer_provider(console=True)
    assert isinstance(provider, TracerProvider) and plan.protocol == "http/protobuf"
    return provider


def _export(provider: TracerProvider, name: str) -> None:
    provider.get_tracer("t").start_span(name, attributes={"egress.decision": "deny"}).end()
    assert provider.force_flush(10_000)


def _transport(provider: TracerProvider) -> Any:
    processor = provider._active_span_processor._span_processors[0]  # OTLP first, then console
    return processor._batch_processor._exporter._client._transport  # type: ignore[attr-defined]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_spans_reach_the_collector_over_one_kept_alive_connection(
    receiver: OtlpHttpReceiver, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**receiver.exporter_env, "OTEL_EXPORTER_OTLP_COMPRESSION": compression}
    provider = _provider(monkeypatch, env)
    transport = _transport(provider)
    assert isinstance(transport, HttpClientTransport)
    try:
        _export(provider, "first")
        conn = transport._conn
        _export(provider, "second")
        assert transport._conn is conn is not None  # the same connection, kept alive
        receiver.sink.wait_for(lambda s: s.name == "second")
        assert [s.name for s in receiver.sink.spans] == ["first", "second"]
        assert receiver.sink.requests == 2
    finally:
        provider.shutdown()


class _ClosingCollector(http.server.BaseHTTPRequestHandler):
    """Accepts each export and then drops the connection without saying so (no
    ``Connection: close``), as a collector restarting or an idle timeout in between does."""

    protocol_version = "HTTP/1.1"
    exports = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).exports += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_stale_kept_alive_connection_costs_no_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosingCollector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    provider = _provider(
        monkeypatch,
        {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    )
    try:
        for n in range(3):
            _export(provider, f"span-{n}")
            assert _ClosingCollector.exports == n + 1  # each batch delivered, none dropped
    finally:
        provider.shutdown()
        server.shutdown()
        server.server_close()


class _Refusing(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    answered = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).answered += 1
        body = b'{"code": 3, "message": "bad"}'
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_refusal_is_answered_to_the_exporter_not_raised() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        transport = HttpClientTransport()
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        result = transport.request("POST", url, data=b"x", timeout=5)
        assert result.error is None and result.status_code == 400
        assert result.headers()["Content-Type"] == "application/json"
        assert result.json()["message"] == "bad"
        transport.close()
        # Nothing listening: an error result the exporter knows to be a connection error.
        server.shutdown()
        server.server_close()
        failed = transport.request("POST", url, data=b"x", timeout=2)
        assert failed.status_code is None and transport.is_connection_error(failed.error)
    finally:
        server.server_close()
