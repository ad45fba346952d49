"""The HTTPS server of ``egress-injector serve``: AdmissionReview v1 on /mutate/*, health, metrics.

A threading stdlib HTTP/1.1 server (keep-alive, as the API server reuses connections), with:
- TLS handshakes done in the connection's thread (a slow client never blocks ``accept``), and the
  certificate files re-read when they change (cert-manager rotates them in place);
- a bound on concurrent connections, a per-connection socket timeout, a request size limit;
- one JSON log line per review; Prometheus metrics on ``/metrics``;
- ``/healthz`` (alive) and ``/readyz`` (ready; 503 while draining after SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from injector.admission import ROUTES, BadReviewError, review
from injector.config import InjectorConfig

log = logging.getLogger("injector.webhook")

DEFAULT_MAX_BODY: Final = 6 * 1024 * 1024  # the API server caps objects at 3 MiB; a review holds 2
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 64


class TLSFiles:
    """A server SSLContext from a certificate and key file, rebuilt when either file changes."""

    def __init__(self, cert_path: str, key_path: str, check_interval: float = 1.0) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._context = self._load()
        self._checked = time.monotonic()

    def _mtimes(self) -> tuple[float, float]:
        return (os.stat(self.cert_path).st_mtime, os.stat(self.key_path).st_mtime)

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.check_interval:
                self._checked = now
                try:
                    stamp = self._mtimes()
                    if stamp != self._stamp:
                        self._context = self._load()
                        self._stamp = stamp
                        log.info(json.dumps({"msg": "reloaded TLS certificate"}))
                except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep the last good one
                    log.warning(json.dumps({"msg": "TLS reload failed", "error": str(exc)}))
            return self._context


@dataclass
class Metrics:
    registry: CollectorRegistry
    reviews: Counter
    duration: Histogram

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            reviews=Counter(
                "egress_injector_reviews",
                "AdmissionReviews answered, by route and outcome",
                ["route", "outcome"],
                registry=registry,
            ),
            duration=Histogram(
                "egress_injector_review_duration_seconds",
                "Time to answer one AdmissionReview, by route and outcome",
                ["route", "outcome"],
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            ),
        )


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        cfg: InjectorConfig,
        tls: TLSFiles | None,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.cfg = cfg
        self.tls = tls
        self.max_body = max_body
        self.conn_timeout = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.metrics = Metrics.create()
        self.draining = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # over the bound: refuse rather than pile up
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.conn_timeout)
        with contextlib.suppress(OSError):  # small replies: no Nagle/delayed-ACK 40 ms stalls
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            Handler(request, client_address, self)
            return
        try:
            conn = self.tls.context().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("TLS handshake from %s failed: %s", client_address, exc)
            return
        try:
            Handler(conn, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # headers and body leave in one write (flushed after each request)
    server_version = "egress-injector"
    sys_version = ""
    server: WebhookServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        if close:
            self.close_connection = True
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path == "/readyz":
            if self.server.draining.is_set():
                self._send(503, b"draining\n", "text/plain")
            else:
                self._send(200, b"ready\n", "text/plain")
        elif path == "/metrics":
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._error(404, f"no such path {path}")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path  # the API server appends ?timeout=...
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.isdigit():
            self._error(411, "Content-Length required", close=True)
            return
        length = int(length_header)
        if length > self.server.max_body:
            self._error(413, f"body of {length} bytes exceeds {self.server.max_body}", close=True)
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return
        if len(body) != length:
            self.close_connection = True
            return
        # (body read first: closing with unread bytes would reset the connection under the reply)
        route = ROUTES.get(path)
        if route is None:
            self._error(404, f"no such path {path}; use one of {', '.join(ROUTES)}")
            return
        started = time.monotonic()
        try:
            result = review(body, route, self.server.cfg)
        except BadReviewError as exc:
            self.server.metrics.reviews.labels(route, "bad-request").inc()
            self.server.metrics.duration.labels(route, "bad-request").observe(
                time.monotonic() - started
            )
            log.warning(json.dumps({"msg": "bad request", "route": route, "error": str(exc)}))
            self._error(400, str(exc))
            return
        payload = json.dumps(result.response).encode()
        self._send(200, payload)
        elapsed = time.monotonic() - started
        self.server.metrics.reviews.labels(route, result.outcome).inc()
        self.server.metrics.duration.labels(route, result.outcome).observe(elapsed)
        log.info(json.dumps({"msg": "review", **result.log}, default=str))


def serve(
    cfg: InjectorConfig,
    host: str,
    port: int,
    tls: TLSFiles | None,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> WebhookServer:
    """Bind the server (serve_forever() is the caller's); port 0 picks a free port."""
    return WebhookServer(
        (host, port),
        cfg,
        tls,
        max_body=max_body,
        timeout=timeout,
        max_connections=max_connections,
    )
