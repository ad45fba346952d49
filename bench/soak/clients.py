"""The soak's clients: asyncio, one process, every request on a new connection of its own.

Plain HTTP: an absolute-form GET to the explicit proxy. HTTPS: CONNECT, then a TLS handshake
with the upstream through the tunnel and a GET inside it. HTTP framing is h11's (strict, and
already a dependency through mitmproxy); each request is bounded by a timeout, the whole load by
a deadline and a request count.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11

from bench.soak.model import HOSTS, Outcome, RequestResult, plan, source_address

READ_CHUNK = 16384
PATH = "/soak"
CLOSE_TIMEOUT = 2.0  # seconds for an orderly close before the connection is aborted


@dataclass(frozen=True)
class Target:
    proxy_host: str
    proxy_port: int
    http_port: int
    https_port: int


class _EarlyCloseError(Exception):
    """The peer closed before a complete response."""


def client_tls() -> ssl.SSLContext:
    # The upstream's certificate names 127.0.0.1, not the soak's host names, and the soak checks
    # the proxy's decisions, not the upstream's identity: no verification.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: h11.Request
) -> h11.Response:
    """Send ``request``; the response, its body read (or, after a CONNECT 2xx, the switch)."""
    conn = h11.Connection(our_role=h11.CLIENT)
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_CHUNK))
        elif isinstance(event, h11.Response):
            response = event
            if conn.their_state is h11.SWITCHED_PROTOCOL:
                return response
        elif isinstance(event, h11.EndOfMessage):
            if response is None:  # h11 never ends a message before its head
                raise _EarlyCloseError("end of message without a response")
            return response
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise _EarlyCloseError(f"{type(event).__name__} before a complete response")


def _header(response: h11.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _classify(response: h11.Response) -> tuple[Outcome, str | None, str | None]:
    """(outcome, policy version of a denial, detail)"""
    if response.status_code == 200:
        return Outcome.ALLOWED, None, None
    if response.status_code == 403 and _header(response, b"x-egress-decision") == "deny":
        return Outcome.DENIED, _header(response, b"x-egress-policy-version"), None
    kind = Outcome.STATUS_5XX if 500 <= response.status_code < 600 else Outcome.OTHER_STATUS
    reason = _header(response, b"x-egress-reason")
    return kind, None, f"{response.status_code}" + (f" {reason}" if reason else "")


async def _request(
    target: Target,
    *,
    source: str,
    scheme: str,
    host: str,
    tls: ssl.SSLContext,
    opened: list[asyncio.StreamWriter],
) -> tuple[Outcome, str | None, str | None]:
    reader, writer = await asyncio.open_connection(
        target.proxy_host, target.proxy_port, local_addr=(source, 0)
    )
    opened.append(writer)  # closed by the caller, outside this request's timeout
    if scheme == "http":
        authority = f"{host}:{target.http_port}"
        request = h11.Request(
            method="GET",
            target=f"http://{authority}{PATH}",
            headers=[("Host", authority), ("Connection", "close")],
        )
        return _classify(await _exchange(reader, writer, request))
    authority = f"{host}:{target.https_port}"
    connect = h11.Request(method="CONNECT", target=authority, headers=[("Host", authority)])
    response = await _exchange(reader, writer, connect)
    if response.status_code != 200:
        return _classify(response)
    await writer.start_tls(tls, server_hostname=host)
    get = h11.Request(method="GET", target=PATH, headers=[("Host", host), ("Connection", "close")])
    return _classify(await _exchange(reader, writer, get))


async def _close(writer: asyncio.StreamWriter, graceful: bool) -> None:
    """Close, bounded: a peer that stopped reading (or never answers TLS close_notify) would
    hold ``wait_closed`` forever, and with it this client and its file descriptor."""
    if graceful:
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
            return
        except (TimeoutError, OSError, ssl.SSLError):
            pass
    writer.transport.abort()


def _error_kind(exc: BaseException) -> Outcome:
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.REFUSED
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return Outcome.RESET
    if isinstance(exc, (_EarlyCloseError, h11.RemoteProtocolError, asyncio.IncompleteReadError)):
        return Outcome.CLOSED
    if isinstance(exc, ssl.SSLError):
        return Outcome.TLS
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        return Outcome.TIMEOUT
    return Outcome.OTHER


async def one_request(n: int, target: Target, tls: ssl.SSLContext, timeout: float) -> RequestResult:
    """Request number ``n``: its host and scheme come from ``plan``, its source address from
    ``source_address``; never raises (an error is an outcome)."""
    role, scheme = plan(n)
    host, source = HOSTS[role], source_address(n)
    started = time.monotonic()
    opened: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(timeout):
            outcome, version, detail = await _request(
                target, source=source, scheme=scheme, host=host, tls=tls, opened=opened
            )
    except Exception as exc:  # every failure is counted by kind, none ends the soak
        outcome, version, detail = _error_kind(exc), None, f"{type(exc).__name__}: {exc}"[:200]
    elapsed = time.monotonic() - started
    for writer in opened:
        await _close(writer, graceful=not outcome.is_error)
    return RequestResult(n, source, scheme, host, outcome, elapsed, version, detail)


async def run_clients(
    *,
    target: Target,
    clients: int,
    seconds: float,
    max_requests: int,
    timeout: float,
    first: int = 0,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """``clients`` concurrent loops, each sending one request after another, until ``seconds``
    have passed or ``max_requests`` were started. Request numbers start at ``first``."""
    tls = client_tls()
    numbers = itertools.count(first)
    last = first + max_requests
    deadline = time.monotonic() + seconds
    results: list[RequestResult] = []

    async def loop() -> None:
        while time.monotonic() < deadline:
            n = next(numbers)
            if n >= last:
                return
            result = await one_request(n, target, tls, timeout)
            results.append(result)
            if on_result is not None:
                on_result(result)

    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(loop())
    return results
