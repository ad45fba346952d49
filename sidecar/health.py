"""Health and metrics on :15021 — /healthz/live, /healthz/ready, /metrics, /debug/destinations.

A plain thread with the standard library's server: kubelet probes must be answered even when the
proxy's event loop is busy, and this needs no framework.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sidecar import contract
from sidecar.destinations import DestinationSummary
from sidecar.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger(__name__)

type ReadinessProbe = Callable[[], tuple[bool, dict[str, Any]]]

# Listen backlog: kubelet probes time out after 1 s, and a burst of probes and scrapes (or a
# node-wide restart) must wait in the kernel's queue, not overflow it. The kernel caps it at
# net.core.somaxconn (4096 on current kernels).
HEALTH_BACKLOG = 1024


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == contract.HEALTH_LIVE_PATH:
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == contract.HEALTH_READY_PATH:
            ready, body = self.server.readiness()
            payload = json.dumps({"ready": ready, **body}, sort_keys=True).encode() + b"\n"
            self._send(200 if ready else 503, payload, "application/json")
        elif path == contract.METRICS_PATH:
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == contract.DEBUG_DESTINATIONS_PATH and self.server.destinations is not None:
            # Hosts, ports and decisions only: never paths or query strings (no secrets).
            summary = json.dumps(self.server.destinations.to_json(), indent=1).encode() + b"\n"
            self._send(200, summary, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds are not news


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True
    # A restarted container binds again at once, although the previous run's connections still
    # sit in TIME_WAIT on this port in the pod's network namespace (SO_REUSEADDR never lets two
    # live listeners share the port; that would be SO_REUSEPORT).
    allow_reuse_address = True
    request_queue_size = HEALTH_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        readiness: ReadinessProbe,
        metrics: Metrics,
        destinations: DestinationSummary | None = None,
    ) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self.destinations = destinations
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's reverse DNS lookup (10 s without DNS, FIELD-NOTES); so
        # TCPServer.server_bind's SO_REUSEADDR is ours to set.
        if self.allow_reuse_address:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="health", daemon=True)
        thread.start()
        return thread
