"""Plain HTTP/1 requests on the fast path (both captures).

One ``HttpPhase`` reads a client connection's requests one after the other: each head bounded
(HeadScanner: 414/431/408), parsed strictly (sidecar.wire.http1: 400 for what it refuses),
decided once (sidecar.fastpath.vetting.vet), re-serialized for the upstream (origin-form,
hop-by-hop fields dropped, Host aligned, traceparent set) and sent on a pooled keep-alive
connection to the vetted address; bodies stream both ways with backpressure. Requests the client
sends ahead (pipelining) are held, bounded, and answered in order, one exchange at a time.

``Expect: 100-continue`` is answered here as the reference answers it (100 Continue once the
request is decided and its upstream is up; the field is not passed on).

Handed to mitmproxy with every byte read from the request on, before any of it went upstream:
an ``Upgrade`` field (WebSocket, h2c), an ``Expect`` other than 100-continue, and a
CONNECT (on the explicit port, one after plain requests; on the transparent port, mitmproxy
refuses it as the reference does), and a request line outside the strict reading (a lowercase
method, tabs, bare LF, a version other than 1.0/1.1: no smuggling shape, and the reference
decides them by their Host). Refused with 400 (nothing sent upstream): every other head
sidecar.wire.http1 refuses (TE+CL, duplicate framing, obs-fold, invalid field names or values:
the smuggling and header-abuse shapes), an invalid authority or Host, a request-target neither
absolute- nor origin-form.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from opentelemetry.context import Context

from sidecar.answers import denial_bytes, failure_bytes, failure_status
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.http_pool import Upstream
from sidecar.fastpath.refusal import HEAD_SAMPLE, Lingering, refuse_head
from sidecar.fastpath.relay import shut_write
from sidecar.fastpath.services import Services
from sidecar.fastpath.upstream import UpstreamError, dial
from sidecar.fastpath.vetting import (
    HTTPS_TARGET,
    MEMO_KEY_CHARS,
    Vetted,
    same_host,
    vet,
    vet_now,
)
from sidecar.memo import remember
from sidecar.policy.errors import InvalidHost
from sidecar.policy.hosts import normalize_host
from sidecar.policy.model import Destination, Reason
from sidecar.policy.store import Snapshot
from sidecar.policy.target import (
    Authority,
    InvalidTarget,
    parse_authority,
    parse_request_target,
)
from sidecar.proxy.headlimits import HeadRejection, HeadScanner, timeout_rejection
from sidecar.proxy.hostnames import address_of, format_hostport, redact_url
from sidecar.record import Capture, DecisionRecord
from sidecar.reporter import OpenDecision
from sidecar.telemetry.spans import error_type, extract_parent, trace_fields
from sidecar.wire.http1 import (
    LAST_CHUNK,
    NO_BODY,
    ChunkedDecoder,
    Framing,
    MessageError,
    RequestHead,
    RequestLineError,
    ResponseHead,
    chunk,
    parse_request_head,
    parse_response_head,
    response_framing,
    response_head_end,
    serialize_request_head,
)

log = logging.getLogger(__name__)

# What a client may send ahead of the request being answered before its reading is paused.
HOLD_LIMIT = 64 * 1024

CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_DISCONNECTED = "upstream_disconnected"

# Hop-by-hop fields end at this proxy (RFC 9110 7.6.1), as Decider._drop_hop_by_hop drops them.
_TRACE_FIELDS = frozenset({b"traceparent", b"tracestate"})
_HOP_BY_HOP = frozenset({b"proxy-connection", b"keep-alive", b"expect"})  # expect: answered here
_PROXY_CREDENTIALS = frozenset({b"proxy-authorization"})
_KEPT_CONNECTION_OPTIONS = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"transfer-encoding", b"host"}
)


def start_explicit(conn: ClientConnection, services: Services, data: bytes) -> None:
    """An explicit-proxy connection whose first request is not a CONNECT; ``data``: what was
    read from it so far (at least that request's head)."""
    HttpPhase(conn, services, None).begin(data)


def start_transparent(
    conn: ClientConnection, services: Services, original: tuple[str, int], data: bytes
) -> None:
    """A redirected connection whose first flight is an HTTP request line; ``original``: the
    destination the app dialled; ``data``: what was read so far."""
    HttpPhase(conn, services, original).begin(data)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes, as it was read (before the decision)."""

    scheme: str
    host: str | None  # the name or literal decided (None: transparent, by address)
    port: int
    path: str  # origin-form, query included
    # The Host value the upstream must see instead of the client's (None: the client's agrees).
    aligned_host: bytes | None = None

    @property
    def policy_path(self) -> str:
        return self.path.split("?", 1)[0] or "/"


# Request targets read before (target, Host, original destination) → Target, bounded: a pod
# sends the same few again and again, and reading one costs as much as its decision.
_TARGETS: dict[tuple[str, str | None, tuple[str, int] | None], Target] = {}
_TARGETS_LIMIT = 4096


class _State:
    HEAD = 0  # reading a request head
    DECIDING = 1  # deciding, connecting: what arrives is held
    SENDING = 2  # the request body is streaming upstream
    WAITING = 3  # the request is sent; its response is awaited or streaming
    DONE = 4  # refused, failed, closed or handed over: nothing more is read here


class Exchange:
    """One request and its response."""

    __slots__ = (
        "body",
        "body_left",
        "chunks_in",
        "client_close",
        "head",
        "opened",
        "rec",
        "req_done",
        "resp",
        "resp_buf",
        "resp_chunks",
        "resp_done",
        "resp_framing",
        "resp_head",
        "resp_left",
        "resp_started",
        "task",
        "up",
    )

    def __init__(self, head: RequestHead) -> None:
        self.head = head
        self.rec: DecisionRecord | None = None
        self.opened: OpenDecision | None = None
        self.up: Upstream | None = None
        self.task: asyncio.Task[None] | None = None
        self.body: Framing = head.framing
        self.body_left = head.framing.length or 0
        self.chunks_in: ChunkedDecoder | None = None
        self.req_done = False
        self.client_close = not head.keep_alive
        self.resp_buf = bytearray()
        self.resp: ResponseHead | None = None
        self.resp_framing: Framing | None = None
        self.resp_left = 0
        self.resp_head = b""  # the final response's head, not written yet
        self.resp_chunks: ChunkedDecoder | None = None
        self.resp_started = False  # bytes of the final response went to the client
        self.resp_done = False


class HttpPhase:
    """The plain-HTTP phase of a client connection (see the module docstring)."""

    __slots__ = (
        "_buf",
        "_client_paused",
        "_conn",
        "_ex",
        "_head_ns",
        "_head_timer",
        "_original",
        "_paused_by",
        "_s",
        "_scanner",
        "_state",
        "_up_write_paused",
        "_used",
    )

    def __init__(
        self, conn: ClientConnection, services: Services, original: tuple[str, int] | None
    ) -> None:
        self._conn = conn
        self._s = services
        self._original = original
        self._buf = bytearray()
        self._state = _State.HEAD
        self._scanner = HeadScanner(services.config.head_limits)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_ns = 0
        self._ex: Exchange | None = None
        self._used = False  # a request of this connection went through the fast path
        self._client_paused = False
        self._up_write_paused = False
        self._paused_by: set[str] = set()

    def begin(self, data: bytes) -> None:
        self._conn.switch(self)
        self._conn.cutter = self
        if data:
            self.data_received(data)
        elif self._conn.eof:
            self._conn.close()

    # -- the client's events -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._state == _State.DONE:
            return
        self._buf += data
        self._pump()

    def eof_received(self) -> bool | None:
        ex = self._ex
        if ex is None or self._state == _State.DONE:
            self._stop_head_timer()
            return False  # between requests (or in a partial head): nothing to answer
        # A client that ends its side mid-exchange has left, as the reference engine reads it.
        self._fail("Client disconnected.", CLIENT_DISCONNECTED)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._ex is not None and self._state != _State.DONE:
            self._fail("Client disconnected.", CLIENT_DISCONNECTED)
        self._state = _State.DONE

    def pause_writing(self) -> None:
        up = self._ex.up if self._ex is not None else None
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self._ex.up if self._ex is not None else None
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.resume_reading()

    def cut(self, message: str) -> None:
        ex = self._ex
        if ex is None or ex.opened is None or ex.rec is None:
            return
        ex.rec.error = message
        if ex.resp is not None:
            ex.rec.status_code = ex.resp.status
        self._end(ex)
        if ex.up is not None:
            ex.up.abort()
        self._state = _State.DONE

    # -- reading requests --------------------------------------------------------------------

    def _pump(self) -> None:
        while True:
            state = self._state
            if state == _State.HEAD:
                if not self._read_head():
                    break
            elif state == _State.SENDING:
                self._send_body()
                break
            else:
                break
        self._flow_control()

    def _flow_control(self) -> None:
        hold = len(self._buf) > HOLD_LIMIT or self._up_write_paused
        transport = self._conn.transport
        if transport is None or self._state == _State.DONE:
            return
        if hold and not self._client_paused:
            self._client_paused = True
            transport.pause_reading()
        elif not hold and self._client_paused:
            self._client_paused = False
            transport.resume_reading()

    def _read_head(self) -> bool:
        """Read the next head from the buffer; True when the loop should go on."""
        buf = self._buf
        if not self._scanner.started:
            skip = len(buf) - len(buf.lstrip(b"\r\n"))
            if skip:
                del buf[:skip]
                self._scanner = HeadScanner(self._s.config.head_limits)
            if not buf:
                return False
            self._head_ns = time.time_ns()
            self._conn.busy = True
        rejection = self._scanner.scan(buf)
        if rejection is not None:
            self._refuse(rejection, bytes(buf[:HEAD_SAMPLE]))
            return False
        if not self._scanner.complete:
            if self._head_timer is None:
                self._head_timer = asyncio.get_running_loop().call_later(
                    self._scanner.limits.timeout, self._head_timed_out
                )
            return False
        self._stop_head_timer()
        end = self._scanner.scanned
        self._scanner = HeadScanner(self._s.config.head_limits)
        self._start_request(bytes(buf[:end]))
        return self._state == _State.HEAD

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._state == _State.HEAD and not self._conn.closed:
            self._refuse(timeout_rejection(self._scanner.limits), bytes(self._buf[:HEAD_SAMPLE]))

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, rejection: HeadRejection, head: bytes) -> None:
        self._stop_head_timer()
        self._state = _State.DONE
        self._buf = bytearray()
        refuse_head(self._conn, self._s, rejection, head, self._original)

    def _hand_over(self, why: str) -> None:
        self._stop_head_timer()
        self._state = _State.DONE
        self._conn.cutter = None
        data, self._buf = bytes(self._buf), bytearray()
        self._s.second_tier.hand_over(self._conn, data, why)

    def _start_request(self, raw: bytes) -> None:
        try:
            head = parse_request_head(raw)
        except RequestLineError:
            # Not the fast path's strict reading, not a smuggling shape either: the reference
            # engine reads it and decides it (e.g. ``get`` or tabs: denied by Host, not 400).
            self._hand_over("request line")
            return
        except MessageError as err:
            self._refuse(HeadRejection(400, Reason.INVALID_REQUEST, str(err)), raw)
            return
        if head.method == "CONNECT":
            self._hand_over("CONNECT after plain requests" if self._used else "CONNECT")
            return
        if head.upgrade:
            self._hand_over("Upgrade")
            return
        if head.expect is not None and head.expect != b"100-continue":
            self._hand_over("Expect")
            return
        try:
            target = self._target(head)
        except InvalidTarget as err:
            self._refuse(HeadRejection(400, Reason.INVALID_DESTINATION, err.reason), raw)
            return
        except MessageError as err:
            self._refuse(HeadRejection(400, Reason.INVALID_DESTINATION, str(err)), raw)
            return
        del self._buf[: len(raw)]
        self._used = True
        ex = self._ex = Exchange(head)
        self._state = _State.DECIDING
        self._decide(ex, target)

    def _target(self, head: RequestHead) -> Target:
        """The request's destination, read as the reference engine reads it."""
        hosts = head.values(b"host")
        if len(hosts) > 1:
            # Read as one value (the reference joins them), which no authority parser accepts.
            joined = b", ".join(hosts).decode("latin-1")
            raise InvalidTarget(joined, "more than one Host field")
        host_header = hosts[0].decode("latin-1") if hosts else None
        key = (head.target, host_header, self._original)
        target = _TARGETS.get(key)
        if target is None:
            target = _read_target(head.target, host_header, self._original)
            if len(head.target) + len(host_header or "") <= MEMO_KEY_CHARS:
                remember(_TARGETS, key, target, _TARGETS_LIMIT)
        return target

    # -- deciding and connecting -------------------------------------------------------------

    def _decide(self, ex: Exchange, target: Target) -> None:
        """Decide the request: at once when no name must be resolved (vet_now), else in a task
        (a task per request costs as much as the rest of its decision)."""
        snap = self._s.store.get()
        original_address = self._original[0] if self._original is not None else None
        dest = Destination(
            target.host,
            target.port,
            address_of(original_address)
            if target.host is None and original_address is not None
            else None,
            ex.head.method.upper(),
            target.policy_path,
        )
        vetted = HTTPS_TARGET if target.scheme == "https" else vet_now(snap, dest, self._s.resolver)
        if vetted is not None:
            self._decided(ex, target, snap, vetted)
        else:
            ex.task = asyncio.get_running_loop().create_task(
                self._resolve_and_decide(ex, target, snap, dest)
            )

    async def _resolve_and_decide(
        self, ex: Exchange, target: Target, snap: Snapshot, dest: Destination
    ) -> None:
        vetted = await vet(self._s.resolver, snap, dest)
        ex.task = None
        if self._state == _State.DONE:
            return
        self._decided(ex, target, snap, vetted)

    def _decided(self, ex: Exchange, target: Target, snap: Snapshot, vetted: Vetted) -> None:
        services = self._s
        conn = self._conn
        head = ex.head
        method = head.method.upper()
        original_address = self._original[0] if self._original is not None else None
        peer = vetted.peer
        rec = ex.rec = DecisionRecord(
            decision=vetted.decision,
            capture=conn.capture,
            protocol=method,
            host=target.host,
            port=target.port,
            policy_source=snap.source,
            policy_version=snap.version,
            mode=snap.mode.value,
            peer_address=peer,
            client_address=conn.peer if not conn.closed else None,
        )
        rec.method = method
        rec.original_address = original_address
        url_host = target.host or original_address or "-"
        url = (
            f"{target.scheme}://{url_host if ':' not in url_host else f'[{url_host}]'}"
            f":{target.port}{target.path}"
        )
        # Only a query, userinfo or fragment can carry what redact_url removes; without them it
        # returns the URL as it is (and costs as much as the decision).
        rec.url = redact_url(url) if "?" in url or "@" in url or "#" in url else url
        opened = ex.opened = services.reporter.begin(
            rec, parent=_parent(head.special), start_ns=self._head_ns
        )
        if not vetted.decision.permits or vetted.address is None:
            rec.status_code = 403
            self._end(ex)
            self._answer_and_close(denial_bytes(rec))
            return
        if conn.closed:
            self._fail("Client disconnected.", CLIENT_DISCONNECTED)
            return
        upstream_head = self._upstream_head(ex, target, opened)
        assert peer is not None
        key = (peer, target.port)
        up = services.http_pool.take(key)
        if up is not None:
            self._send_head(ex, up, upstream_head)
        else:
            ex.task = asyncio.get_running_loop().create_task(self._connect(ex, key, upstream_head))

    async def _connect(self, ex: Exchange, key: tuple[str, int], upstream_head: bytes) -> None:
        services = self._s
        conn = self._conn
        try:
            _, up = await dial(
                key[0],
                key[1],
                lambda: Upstream(services.http_pool, key),
                services.config.connect_timeout,
            )
        except UpstreamError as err:
            ex.task = None
            category = err.error_type
            if category == "upstream_error" and conn.closed:
                category = CLIENT_DISCONNECTED
            self._fail(err.message, category)
            return
        ex.task = None
        if conn.closed or self._state == _State.DONE:
            services.http_pool.give(up)  # unused: good for the next request
            if self._state != _State.DONE:
                self._fail("Client disconnected.", CLIENT_DISCONNECTED)
            return
        self._send_head(ex, up, upstream_head)

    def _send_head(self, ex: Exchange, up: Upstream, upstream_head: bytes) -> None:
        ex.up = up
        up.owner = self
        up.used += 1
        assert up.transport is not None
        up.transport.write(upstream_head)
        if ex.head.expect is not None and self._conn.transport is not None:
            # As the reference does: the proxy says 100 Continue itself once the request is
            # decided and its upstream is up; the upstream never sees the Expect field.
            self._conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._state = _State.SENDING
        self._pump()

    def _upstream_head(self, ex: Exchange, target: Target, opened: OpenDecision) -> bytes:
        """The request head the upstream sees: re-serialized from the parsed fields."""
        head = ex.head
        special = head.special
        headers = head.headers
        listed = head.connection_tokens - _KEPT_CONNECTION_OPTIONS
        dropped = listed | _HOP_BY_HOP
        if self._conn.capture is Capture.EXPLICIT:
            dropped = dropped | _PROXY_CREDENTIALS  # credentials for this proxy
        if target.aligned_host is not None:
            headers = _set_field(headers, b"Host", target.aligned_host, b"host" in special)
        for name, value in trace_fields(opened.span):
            headers = _set_field(headers, name, value, name in special)
        if listed or not dropped.isdisjoint(special):
            headers = [(n, v) for n, v in headers if n.lower() not in dropped]
        return serialize_request_head(head.method, target.path, head.version, headers)

    # -- sending the request body --------------------------------------------------------------

    def _send_body(self) -> None:
        ex = self._ex
        assert ex is not None and ex.up is not None and ex.up.transport is not None
        write = ex.up.transport.write
        buf = self._buf
        body = ex.body
        if body.chunked:
            if ex.chunks_in is None:
                limits = self._s.config.head_limits
                ex.chunks_in = ChunkedDecoder(limits.field_line, limits.head)
            out: list[bytes] = []
            try:
                used = ex.chunks_in.feed(buf, out)
            except MessageError as err:
                # Framing the proxy cannot follow: the connection is cut (as the reference
                # engine cuts it); nothing more of it goes upstream.
                self._fail(f"invalid request body: {err}", error_type(str(err)), cut=True)
                return
            del buf[:used]
            for piece in out:
                if piece:
                    write(chunk(piece))
            if ex.chunks_in.done:
                write(LAST_CHUNK)
                self._request_sent(ex)
        else:
            take = min(ex.body_left, len(buf))
            if take:
                write(bytes(buf[:take]))
                del buf[:take]
                ex.body_left -= take
            if not ex.body_left:
                self._request_sent(ex)

    def _request_sent(self, ex: Exchange) -> None:
        ex.req_done = True
        self._state = _State.WAITING
        if ex.resp_done:
            self._finish(ex)

    # -- the upstream's events (UpstreamOwner) -------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        ex = self._ex
        if ex is None or ex.resp_done or self._state == _State.DONE:
            if ex is not None and ex.up is not None:
                ex.up.abort()  # bytes after a complete response: never reused
            return
        try:
            self._read_response(ex, data)
        except MessageError as err:
            self._fail(f"invalid response: {err}", "upstream_error", bad_gateway=True)

    def _read_response(self, ex: Exchange, data: bytes) -> None:
        client = self._conn.transport
        assert client is not None
        limits = self._s.config.head_limits
        while ex.resp_framing is None and not ex.resp_done:
            # A head that arrives whole (the usual case) is read from ``data`` without a copy
            # into the buffer and back.
            buf: bytes | bytearray = data
            if ex.resp_buf:
                ex.resp_buf += data
                buf = ex.resp_buf
            data = b""
            end = response_head_end(buf, limits.head)
            if not end:
                if buf is not ex.resp_buf:
                    ex.resp_buf += buf
                return
            raw = bytes(buf[:end])
            rest = bytes(buf[end:])
            if ex.resp_buf:
                ex.resp_buf = bytearray()
            resp = parse_response_head(raw)
            if resp.status == 101:
                raise MessageError("101 Switching Protocols to a request without Upgrade")
            if resp.status < 200:
                if not self._conn.closed:
                    client.write(raw)  # 1xx: relayed (e.g. 103 Early Hints), then the final one
                data = rest
                continue
            ex.resp = resp
            framing = response_framing(resp, ex.head.method)
            closing = self._s.front.draining or ex.client_close
            if framing is not None and not framing.chunked and framing.length is None:
                ex.client_close = closing = True  # close-delimited: the client sees the end
            if closing and b"close" not in resp.connection_tokens:
                raw = raw[:-2] + b"connection: close\r\n\r\n"
                ex.client_close = True
            ex.resp_started = True
            if framing is None or framing.length == 0:
                if not self._conn.closed:
                    client.write(raw)
                ex.resp_framing = NO_BODY
                self._response_done(ex, rest)
                return
            ex.resp_framing = framing
            ex.resp_left = framing.length or 0
            ex.resp_head = raw  # goes out with the first body bytes: one write, not two
            data = rest
        if data and not ex.resp_done:
            self._response_body(ex, data)
        if ex.resp_head:
            head, ex.resp_head = ex.resp_head, b""
            if not self._conn.closed:
                client.write(head)

    def _response_body(self, ex: Exchange, data: bytes) -> None:
        client = self._conn.transport
        assert client is not None and ex.resp_framing is not None
        framing = ex.resp_framing
        head, ex.resp_head = ex.resp_head, b""
        if framing.chunked:
            if head and not self._conn.closed:
                client.write(head)
            if ex.resp_chunks is None:
                limits = self._s.config.head_limits
                ex.resp_chunks = ChunkedDecoder(limits.field_line, limits.head)
            out: list[bytes] = []
            used = ex.resp_chunks.feed(data, out)
            if not self._conn.closed:
                for piece in out:
                    if piece:
                        client.write(chunk(piece))
            if ex.resp_chunks.done:
                if not self._conn.closed:
                    client.write(LAST_CHUNK)
                self._response_done(ex, data[used:])
        elif framing.length is not None:
            take = min(ex.resp_left, len(data))
            if not self._conn.closed:
                client.write(head + (data[:take] if take < len(data) else data))
            ex.resp_left -= take
            if not ex.resp_left:
                self._response_done(ex, data[take:])
        elif not self._conn.closed:
            client.write(head + data)  # close-delimited: until the upstream's EOF

    def _response_done(self, ex: Exchange, extra: bytes) -> None:
        ex.resp_done = True
        if extra and ex.up is not None:
            ex.up.abort()  # more than the response: this connection is not to be trusted
            ex.up = None
        if ex.req_done:
            self._finish(ex)
        else:
            # Answered before the whole request was read (e.g. 413): the request's end cannot
            # be found reliably any more; the connection closes after the answer.
            ex.client_close = True
            self._finish(ex)

    def upstream_eof(self) -> None:
        ex = self._ex
        if ex is None or self._state == _State.DONE or ex.resp_done:
            return
        framing = ex.resp_framing
        if (
            framing is not None
            and not framing.chunked
            and framing.length is None
            and ex.resp is not None
        ):
            self._response_done(ex, b"")  # a close-delimited body ends here
            return
        self._fail("Server disconnected.", UPSTREAM_DISCONNECTED)

    def upstream_lost(self, exc: Exception | None) -> None:
        ex = self._ex
        if ex is None or self._state == _State.DONE or ex.resp_done:
            return
        ex.up = None
        framing = ex.resp_framing
        if framing is not None and not framing.chunked and framing.length is None:
            self._response_done(ex, b"")
            return
        self._fail(str(exc) if exc else "Server disconnected.", UPSTREAM_DISCONNECTED)

    def upstream_pause_writing(self) -> None:
        self._up_write_paused = True
        self._flow_control()

    def upstream_resume_writing(self) -> None:
        self._up_write_paused = False
        self._flow_control()
        if self._state == _State.SENDING:
            self._pump()

    # -- the end of an exchange ----------------------------------------------------------------

    def _end(self, ex: Exchange) -> None:
        if ex.opened is not None:
            self._s.reporter.end(ex.opened)

    def _finish(self, ex: Exchange) -> None:
        """The response is complete (and the request sent): report, pool, go on."""
        assert ex.rec is not None and ex.resp is not None
        ex.rec.status_code = ex.resp.status
        self._end(ex)
        up, ex.up = ex.up, None
        if up is not None:
            framing = ex.resp_framing
            delimited = framing is not None and (framing.chunked or framing.length is not None)
            if ex.resp.keep_alive and delimited and ex.req_done and up.usable:
                self._s.http_pool.give(up)
            else:
                up.close()
        self._ex = None
        self._conn.busy = False
        if ex.client_close or self._s.front.draining or self._conn.eof:
            self._state = _State.DONE
            self._conn.close()
            return
        self._state = _State.HEAD
        self._up_write_paused = False
        self._pump()

    def _fail(
        self, message: str, category: str, *, bad_gateway: bool = False, cut: bool = False
    ) -> None:
        """The exchange failed: the span says how; the client gets our 502/504 if nothing of
        the response reached it yet, else the connection closes."""
        ex = self._ex
        self._state = _State.DONE
        self._conn.busy = False
        if ex is None:
            self._conn.close()
            return
        if ex.task is not None and ex.task is not asyncio.current_task():
            ex.task.cancel()
        if ex.up is not None:
            ex.up.abort()
            ex.up = None
        rec = ex.rec
        answer = b""
        if rec is not None:
            rec.error = message
            rec.error_type = category
            if ex.resp_started and ex.resp is not None:
                rec.status_code = ex.resp.status
            elif category != CLIENT_DISCONNECTED and not self._conn.closed and not cut:
                rec.status_code = 502 if bad_gateway else failure_status(category)
                answer = failure_bytes(rec, rec.status_code)
            self._end(ex)
        self._ex = None
        if answer:
            self._answer_and_close(answer)
        elif cut:
            self._conn.abort()
        else:
            self._conn.close()

    def _answer_and_close(self, answer: bytes) -> None:
        """Our own answer (a denial, a failure), then the connection ends as a refused head's
        does: half-closed, what the client still sends read and discarded for a while."""
        self._state = _State.DONE
        self._conn.busy = False
        self._conn.cutter = None
        self._ex = None
        transport = self._conn.transport
        if transport is None or self._conn.closed:
            return
        transport.write(answer)
        if self._conn.eof or not transport.can_write_eof():
            transport.close()
            return
        if shut_write(transport):  # False: the client is gone already (aborted)
            self._conn.switch(Lingering(self._conn))


def _read_target(text: str, host_header: str | None, original: tuple[str, int] | None) -> Target:
    """A request-target and its Host read (see HttpPhase._target)."""
    absolute = parse_request_target(text) if "://" in text else None
    if absolute is not None and host_header == _authority_text(text):
        host_authority: Authority | None = absolute.authority  # the same text: one reading
    else:
        host_authority = parse_authority(host_header) if host_header is not None else None
    if absolute is None and not text.startswith("/"):
        raise MessageError("a request-target neither absolute- nor origin-form")
    if original is not None:
        host = absolute.authority.host if absolute is not None else None
        if host is None and host_authority is not None:
            host = host_authority.host
        target = Target(
            absolute.scheme if absolute is not None else "http",
            host,
            original[1],
            absolute.path if absolute is not None else text,
        )
    elif absolute is not None:
        target = Target(absolute.scheme, absolute.authority.host, absolute.port, absolute.path)
    elif host_authority is None:
        raise MessageError("HTTP request has no host header, destination unknown.")
    else:
        target = Target("http", host_authority.host, host_authority.port or 80, text)
    if target.host is None:
        return target
    return replace(target, aligned_host=_aligned_host(host_header, target))


def _authority_text(target: str) -> str:
    """The authority of an absolute-form target, as written (parse_request_target's cut)."""
    return target.partition("://")[2].partition("/")[0]


def _parent(special: dict[bytes, list[bytes]]) -> Context | None:
    """The incoming trace context (the parent of our span), if the request carries one."""
    if b"traceparent" not in special:
        return None
    carrier = {
        name.decode("latin-1"): values[0].decode("latin-1")
        for name, values in special.items()
        if name in _TRACE_FIELDS
    }
    return extract_parent(carrier)


def _set_field(
    headers: list[tuple[bytes, bytes]], name: bytes, value: bytes, present: bool
) -> list[tuple[bytes, bytes]]:
    """``name`` set to ``value``: in place of the first such field (the others removed), else
    appended (as mitmproxy's Headers do: the differential test compares the bytes)."""
    if not present:
        return [*headers, (name, value)]
    lowered = name.lower()
    out: list[tuple[bytes, bytes]] = []
    placed = False
    for n, v in headers:
        if n.lower() == lowered:
            if not placed:
                out.append((n, value))
                placed = True
        else:
            out.append((n, v))
    if not placed:
        out.append((name, value))
    return out


def _aligned_host(current: str | None, target: Target) -> bytes | None:
    """Host names the host that was decided (see Decider._align_host_header: a server hosting
    several sites must not route by a Host the policy never saw); None: the client's agrees and
    is kept, byte for byte."""
    assert target.host is not None
    host, port = target.host, target.port
    if current is not None and current == format_hostport(host, port, 80):
        return None  # names the decided host as the target did: agrees, byte for byte
    if current is not None:
        try:
            if same_host(parse_authority(current).host, host):
                return None
        except InvalidTarget:
            pass
    try:
        ascii_host = normalize_host(host)
    except InvalidHost:
        ascii_host = host
    default = 443 if target.scheme == "https" else 80
    return format_hostport(ascii_host, port, default).encode("latin-1")
