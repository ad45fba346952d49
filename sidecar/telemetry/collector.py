"""The lean exporter's HTTP/1.1 connection to the OTLP collector: one POST at a time over one
kept-alive socket (TLS when the endpoint is https), the answer read by httptools (llhttp).

Why not ``http.client``: measured here, one POST of 64 spans through it cost ~120 us of user
CPU and ~70 us of system CPU (the request built field by field, the head and body sent apart,
the answer's header block parsed by the ``email`` package), against ~18 us and ~34 us this way.
Under load a batch carries 512 spans and that is noise, but a pod with little traffic sends a
batch of a few spans every OTEL_BSP_SCHEDULE_DELAY: there the POST is most of what exporting
a span costs. httptools is the fast path's parser already (strict llhttp), so nothing new loads.

Like the SDK's exporters, it reads no proxy variables: spans go straight to the collector,
never through the sidecar itself.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence

import httptools

from sidecar.proxy.hostnames import format_hostport

MAX_RESPONSE = 1024 * 1024  # an ExportTraceServiceResponse is a few bytes; a Status a few KiB
_SMALL_BODY = 16 * 1024  # sent with its head in one write; a larger one is not copied for that

# RFC 9110 field names are tokens; a value is visible characters, blanks and obs-text: no
# control character (CR or LF would end the field; strict llhttp refuses the others).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class CollectorProtocolError(Exception):
    """The collector's answer was not an HTTP/1.1 response this client can read."""


_BLANKS = " \t"  # RFC 9110's OWS


def valid_field(name: str, value: str) -> bool:
    """Whether ``name: value`` can be written as a request header field as it is."""
    return _TOKEN.fullmatch(name) is not None and _BAD_VALUE.search(value) is None


class _Answer:
    """httptools callbacks: the final response's status, its body's size so far and whether
    the connection stays open. A 1xx answer is passed over (llhttp parses what follows it as
    the next message)."""

    __slots__ = ("body", "complete", "framed", "head", "keep_alive", "parser", "status")

    def __init__(self) -> None:
        self.body = 0
        self.complete = False
        self.head = False  # a final answer's head was read
        self.framed = False  # its length is given (Content-Length or chunked): not to the close
        self.keep_alive = False
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.head = self.parser.get_status_code() >= 200

    def on_body(self, data: bytes) -> None:
        self.body += len(data)
        if self.body > MAX_RESPONSE:
            raise CollectorProtocolError(f"response body over {MAX_RESPONSE} bytes")

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:
            self.status = status
            self.keep_alive = self.parser.should_keep_alive()
            self.complete = True
        else:
            self.body = 0
            self.framed = False


class CollectorConnection:
    """POSTs to one collector URL; not thread-safe (the export thread's, under its lock)."""

    def __init__(  # noqa: PLR0917 (the settings' fields, once per process)
        self,
        scheme: str,
        host: str,
        port: int,
        path: str,
        headers: Sequence[tuple[str, str]],
        timeout: float,
        certificate: str | None,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"collector URL scheme {scheme!r} is not http or https")
        self._host, self._port, self._timeout = host, port, timeout
        self._https, self._certificate = scheme == "https", certificate
        # Built on the first connection: a CA file that cannot be read fails each export (and
        # says so in the log) rather than the sidecar's start.
        self._tls: ssl.SSLContext | None = None
        host_field = format_hostport(host, port, 443 if scheme == "https" else 80)
        fields = [("Host", host_field), *headers]
        fields.append(("Content-Type", "application/x-protobuf"))
        # Blanks around a value are not part of it (RFC 9110 5.5), but llhttp keeps a trailing
        # tab: written without them, every parser reads the same value.
        lines = "".join(f"{name}: {value.strip(_BLANKS)}\r\n" for name, value in fields)
        self._head = f"POST {path} HTTP/1.1\r\n{lines}".encode("latin-1", "replace")
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._https:
                if self._tls is None:
                    self._tls = ssl.create_default_context(cafile=self._certificate)
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        return sock

    def post(self, body: bytes, *, gzipped: bool) -> int:
        """POST ``body``; the final response's status. Raises OSError (connection, timeout, TLS)
        or CollectorProtocolError, after which the connection is closed (the next POST opens a
        new one)."""
        head = self._head
        if gzipped:
            head += b"Content-Encoding: gzip\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        try:
            if self._sock is None:
                self._sock = self._connect()
            sock = self._sock
            if len(body) <= _SMALL_BODY:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
            status, keep_alive = self._read(sock)
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return status

    @staticmethod
    def _read(sock: socket.socket) -> tuple[int, bool]:
        """The final response: its status and whether the connection can carry the next
        request."""
        answer = _Answer()
        read = 0
        while not answer.complete:
            data = sock.recv(65536)
            if not data:
                if answer.head and not answer.framed:
                    # A body read to the close (no length given): it ends with the connection.
                    return answer.parser.get_status_code(), False
                if not read:
                    # What a kept-alive connection the collector closed meanwhile answers.
                    raise ConnectionResetError("the collector closed the connection")
                raise CollectorProtocolError("the collector closed the connection mid-answer")
            read += len(data)
            try:
                answer.parser.feed_data(data)
            except httptools.HttpParserUpgrade as err:
                raise CollectorProtocolError("the collector switched protocols") from err
            except httptools.HttpParserError as err:
                if isinstance(err.__context__, CollectorProtocolError):
                    raise err.__context__ from None
                raise CollectorProtocolError(f"unreadable answer: {err}") from err
        return answer.status, answer.keep_alive
