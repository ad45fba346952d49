"""A local OTLP http/protobuf trace receiver for the span-export scenario: it accepts
POST /v1/traces, decodes each request (so a span counts only if it arrived whole) and answers
200. It keeps counts, not spans: the bench wants proof that export happened and when it was
done, not the spans' contents (tests/support/otlp.py is the receiver that keeps them)."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from bench.configs import LOOPBACK

_RESPONSE = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


def count_spans(body: bytes) -> int:
    """Spans in one serialized ExportTraceServiceRequest."""
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


class SpanCounter(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = LOOPBACK) -> None:
        self.spans = 0
        self.exports = 0
        self.refused = 0  # requests that were not a decodable export
        self._cond = threading.Condition()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    if self.path != "/v1/traces":
                        raise ValueError(self.path)
                    if self.headers.get("content-encoding") == "gzip":
                        body = gzip.decompress(body)
                    spans = count_spans(body)
                except Exception:  # a bad request is counted and refused, never fatal here
                    counter.add(None)
                    self._answer(400, b"")
                    return
                counter.add(spans)
                self._answer(200, _RESPONSE)

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__((host, 0), Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="otlp")
        self._thread.start()

    def add(self, spans: int | None) -> None:
        with self._cond:
            if spans is None:
                self.refused += 1
            else:
                self.exports += 1
                self.spans += spans
            self._cond.notify_all()

    @property
    def endpoint(self) -> str:
        return f"http://{self.server_address[0]!s}:{self.server_address[1]}"

    def wait_for(self, count: int, timeout: float, quiet: float = 2.0) -> int:
        """Wait until ``count`` spans arrived in all, or none arrived for ``quiet`` seconds
        (the exporter has nothing left), at most ``timeout`` seconds; the count."""
        deadline = time.monotonic() + timeout
        with self._cond:
            last_count, last_change = self.spans, time.monotonic()
            while self.spans < count:
                now = time.monotonic()
                if self.spans != last_count:
                    last_count, last_change = self.spans, now
                left = min(deadline, last_change + quiet) - now
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.spans

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)
