"""mitmproxy's HTTP/1 server side (the client's connection), with bounded request heads and the
sidecar's own answers where mitmproxy would write its HTML error page.

Both listeners (explicit and transparent) build their client connection's HTTP/1 layer from
``mitmproxy.proxy.layers.http.Http1Server``; ``install_http1_server`` puts this subclass there.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from h11 import RemoteProtocolError
from h11._events import Data, EndOfMessage
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import HTTPMode, _http1, validate_request
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import HttpEvent, RequestHeaders, ResponseProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Server, TBodyReader, make_body_reader

from sidecar.policy.model import Reason
from sidecar.policy.target import InvalidTarget, parse_authority
from sidecar.proxy.headlimits import (
    LINGER_SECONDS,
    HeadLimits,
    HeadRejection,
    HeadScanner,
    timeout_rejection,
)

_HEAD_SAMPLE = 8 * 1024 + 64  # enough of a refused head to read its method and target
# What an HTTP/1 request line may carry. mitmproxy reads "HTTP/2.0" there as an HTTP/2 request
# (its Host is then the :authority, which an HTTP/1 upstream never sees): the decided host and
# the Host header the upstream routes by could differ. Refused with 400, as every head HTTP/1
# forbids is (docs/troubleshooting.md, "invalid request").
_HTTP1_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})


class BoundedChunkedReader(ChunkedReader):
    """h11's chunked body reader with the head's bounds on its lines, and no trailers.

    h11 buffers a chunk-size line (with its extensions) and a trailer section without bound, and
    mitmproxy crashes on trailers it does not implement ("HTTP trailers are not implemented
    yet"). Here a chunk line longer than a header line, or a trailer section larger than a head,
    is a protocol error (the connection is closed, the span says so), and received trailer
    fields are dropped: RFC 9110 6.5.1 lets a recipient discard them, and nothing in them is
    decided.
    """

    def __init__(self, limits: HeadLimits) -> None:
        super().__init__()
        self._limits = limits

    def __call__(self, buf: ReceiveBuffer) -> Data | EndOfMessage | None:
        event = super().__call__(buf)
        if isinstance(event, EndOfMessage):
            return EndOfMessage()
        if event is not None:
            return event
        if self._reading_trailer:
            if len(buf) > self._limits.head:
                raise RemoteProtocolError(f"trailer section larger than {self._limits.head} bytes")
        elif (
            self._bytes_in_chunk == 0
            and not self._bytes_to_discard
            and len(buf) > self._limits.field_line
        ):
            raise RemoteProtocolError(
                f"chunk size line longer than {self._limits.field_line} bytes"
            )
        return None


def bounded_body_reader(expected_size: int | None) -> TBodyReader:
    """mitmproxy's body reader for a request or a response, chunked ones bounded."""
    if expected_size is None:
        return BoundedChunkedReader(GuardedHttp1Server.limits)
    return make_body_reader(expected_size)


class Http1Hooks(Protocol):
    def head_rejected(self, context: Context, rejection: HeadRejection, head: bytes) -> bytes:
        """Record a refused request head; the bytes of the response to send."""
        ...

    def error_answer(self, context: Context, event: ResponseProtocolError) -> bytes | None:
        """The response to send instead of mitmproxy's error page (None: mitmproxy's)."""
        ...


class GuardedHttp1Server(Http1Server):
    limits: ClassVar[HeadLimits] = HeadLimits()
    hooks: ClassVar[Http1Hooks | None] = None

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._scanner = HeadScanner(self.limits)
        self._rejection: HeadRejection | None = None
        self._head_timer: commands.RequestWakeup | None = None
        self._linger_timer: commands.RequestWakeup | None = None

    def _new_head(self) -> None:
        self._scanner = HeadScanner(self.limits)
        self._head_timer = None

    @property
    def _buffered(self) -> bytearray:
        # The unparsed bytes, scanned in place: copying them on every arrival would make a head
        # sent one byte at a time cost quadratic time.
        return self.buf._data

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if event.command is self._linger_timer:
                yield commands.CloseConnection(self.conn)
            elif (
                event.command is self._head_timer
                and self.state == self.read_headers
                and not self._scanner.complete
                and self.conn.state & ConnectionState.CAN_READ
            ):
                yield from self._refuse(
                    timeout_rejection(self.limits), bytes(self._buffered[:_HEAD_SAMPLE])
                )
            return  # our timers only: nothing below asked for a wakeup
        if isinstance(event, events.DataReceived) and (
            self._rejection is not None or self.state == self.lingering
        ):
            return  # refused: what follows is not buffered
        yield from super()._handle_event(event)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        # mitmproxy's read_headers, with limits: it buffered a head without bound.
        if isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)
            return
        if not isinstance(event, events.DataReceived):
            raise AssertionError(f"Unexpected event: {event}")
        if not self._scanner.started:
            # Empty lines before a request line are ignored (RFC 9112 2.2), not a head.
            data = self._buffered
            skip = len(data) - len(data.lstrip(b"\r\n"))
            if skip:
                self.buf.maybe_extract_at_most(skip)
                self._new_head()
        rejection = self._rejection or self._scanner.scan(self._buffered)
        if rejection is not None:
            yield from self._refuse(rejection, bytes(self._buffered[:_HEAD_SAMPLE]))
            return
        if not self._scanner.complete:
            if self._scanner.started and self._head_timer is None:
                self._head_timer = commands.RequestWakeup(self.limits.timeout)
                yield self._head_timer
            return
        lines = self.buf.maybe_extract_lines()
        if not lines:  # pragma: no cover - the scanner and h11 agree on where a head ends
            return
        self._new_head()
        raw = [bytes(x) for x in lines]
        try:
            self.request = http1.read_request_head(raw)
            if self.request.http_version not in _HTTP1_VERSIONS:
                yield from self._refuse(
                    HeadRejection(
                        400,
                        Reason.INVALID_REQUEST,
                        f"HTTP version {self.request.http_version[:16]!r} on an HTTP/1 "
                        "connection (HTTP/1.0 and HTTP/1.1 only)",
                    ),
                    b"\r\n".join(raw[:1]),
                )
                return
            expected_body_size = http1.expected_http_body_size(self.request)
            problem = validate_request(
                self._mode(), self.request, self.context.options.validate_inbound_headers
            )
            if problem:
                raise ValueError(problem)
            if self.request.authority:
                # Read again as `check` reads it: what check refuses never gets another reading
                # here (mitmproxy reads "host:0" as port 80, for one).
                parse_authority(self.request.authority)
            if self.request.host_header:
                # The Host too (RFC 9112 3.2: an invalid Host gets 400). Unread, it named no host
                # to decide, so the transparent listener decided the address and relayed a Host
                # that servers read their own way ("denied.test:" is denied.test to nginx).
                parse_authority(self.request.host_header)
        except InvalidTarget as err:
            yield from self._refuse(
                HeadRejection(400, Reason.INVALID_DESTINATION, err.reason), b"\r\n".join(raw[:1])
            )
            return
        except ValueError as err:
            yield from self._refuse(
                HeadRejection(400, Reason.INVALID_REQUEST, str(err)), b"\r\n".join(raw[:1])
            )
            return
        yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, expected_body_size == 0))
        self.body_reader = bounded_body_reader(expected_body_size)
        self.state = self.read_body
        yield from self.state(event)

    def _mode(self) -> HTTPMode:
        for above in reversed(self.context.layers):
            if isinstance(above, http_layers.HttpLayer):
                return above.mode
        return HTTPMode.regular

    def wait(self, event: events.Event) -> layer.CommandGenerator[None]:
        # A pipelined next head arrives while a response is in flight: bounded the same way,
        # refused once the current response is done (read_headers sees the rejection).
        if isinstance(event, events.DataReceived) and self._rejection is None:
            self._rejection = self._scanner.scan(self._buffered)
        yield from super().wait(event)

    def _refuse(self, rejection: HeadRejection, head: bytes) -> layer.CommandGenerator[None]:
        self._rejection = rejection
        self.buf = ReceiveBuffer()
        hooks = self.hooks
        answer = hooks.head_rejected(self.context, rejection, head) if hooks else b""
        if answer:
            yield commands.SendData(self.conn, answer)
        yield commands.CloseTcpConnection(self.conn, half_close=True)
        self.state = self.lingering
        self._linger_timer = commands.RequestWakeup(LINGER_SECONDS)
        yield self._linger_timer

    def lingering(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)

    def send(self, event: HttpEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and self.response is None and self.hooks:
            answer = self.hooks.error_answer(self.context, event)
            if answer is not None:
                if self.conn.state & ConnectionState.CAN_WRITE:
                    yield commands.SendData(self.conn, answer)
                yield commands.CloseConnection(self.conn)
                return
        yield from super().send(event)


def install_http1_server(limits: HeadLimits, hooks: Http1Hooks) -> None:
    """Make mitmproxy's HTTP layers serve clients with ``GuardedHttp1Server``."""
    GuardedHttp1Server.limits = limits
    GuardedHttp1Server.hooks = hooks
    # HttpLayer looks the class up in its module on each new client connection.
    setattr(http_layers, "Http1Server", GuardedHttp1Server)  # noqa: B010
    # The upstream side (Http1Client) reads response bodies through the module's factory: an
    # upstream's trailer fields crashed the connection as a client's did.
    setattr(_http1, "make_body_reader", bounded_body_reader)  # noqa: B010
