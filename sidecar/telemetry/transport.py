"""The OTLP/HTTP exporter's transport over ``http.client``: one kept-alive connection.

The exporter's default transport is ``requests``, which brings urllib3, charset_normalizer,
certifi, brotli, zstd and http.cookiejar into the process: ~6 MiB of RSS in every pod for one
POST every few seconds (~2.5 MiB with the urllib3 transport). ``http.client`` is loaded anyway
(the Kubernetes client, the health server). The exporter keeps its own retry, backoff,
Retry-After, compression and header handling; this only sends the request.

Like the exporter's own transports it reads no proxy variables: spans go straight to the
collector, never through the sidecar itself.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport

MAX_RESPONSE = 1024 * 1024  # an ExportTraceServiceResponse is a few bytes; a Status a few KiB


@dataclass(frozen=True, slots=True)
class HttpClientResult(BaseHTTPResult):
    body: bytes = b""
    header_map: Mapping[str, str] = field(default_factory=dict)

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        return self.header_map


class _Headers(dict[str, str]):
    """Case-insensitive lookups, as the transport interface requires (keys stored lowercase)."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)


class HttpClientTransport(BaseHTTPTransport):
    def __init__(
        self, *, verify: bool | str = True, cert: str | tuple[str, str] | None = None
    ) -> None:
        self._verify = verify
        self._cert = cert
        self._context: ssl.SSLContext | None = None  # built on the first https request
        self._conn: http.client.HTTPConnection | None = None
        self._target: tuple[str, str, int] | None = None  # (scheme, host, port) of _conn
        self._lock = threading.Lock()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            if self._verify is False:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif isinstance(self._verify, str):
                context = ssl.create_default_context(cafile=self._verify)
            else:
                context = ssl.create_default_context()
            if isinstance(self._cert, tuple):
                context.load_cert_chain(self._cert[0], self._cert[1])
            elif self._cert:
                context.load_cert_chain(self._cert)
            self._context = context
        return self._context

    def _connection(self, url: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        https = url.scheme == "https"
        target = (url.scheme, url.hostname or "", url.port or (443 if https else 80))
        if self._conn is not None and self._target == target:
            return self._conn
        self._drop()
        conn: http.client.HTTPConnection
        if https:
            conn = http.client.HTTPSConnection(target[1], target[2], context=self._ssl_context())
        else:
            conn = http.client.HTTPConnection(target[1], target[2])
        self._conn, self._target = conn, target
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._target = None

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        parsed = urllib.parse.urlsplit(url)
        path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        with self._lock:
            try:
                if parsed.scheme not in ("http", "https"):
                    raise ValueError(f"unsupported URL scheme in {url!r}")
                conn = self._connection(parsed)
                conn.timeout = timeout  # applies to a new connection's socket
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(method, path, body=data, headers=headers or {})
                response = conn.getresponse()
                body = response.read(MAX_RESPONSE)
                # Not closed after the read: larger than we read, the connection is unusable.
                if not response.isclosed() or response.will_close:
                    self._drop()
                header_map = _Headers()
                for name, value in response.getheaders():
                    key = name.lower()
                    header_map[key] = f"{header_map[key]}, {value}" if key in header_map else value
                return HttpClientResult(
                    status_code=response.status,
                    reason=response.reason,
                    body=body,
                    header_map=header_map,
                )
            except Exception as error:
                # Whatever state the connection is in, the next request starts a fresh one
                # (the exporter retries a connection error at once, as for a stale pooled one).
                self._drop()
                return HttpClientResult(error=error)

    def is_connection_error(self, exception: Exception | None) -> bool:
        return isinstance(exception, OSError | http.client.HTTPException)

    def close(self) -> None:
        with self._lock:
            self._drop()
