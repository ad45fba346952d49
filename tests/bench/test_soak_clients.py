"""The soak's client against misbehaving peers on loopback: every request ends, bounded in time,
with its error kind, and leaves no connection open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest

from bench.servers import free_port
from bench.soak.clients import CLOSE_TIMEOUT, Target, client_tls, one_request
from bench.soak.model import Outcome, plan

TIMEOUT = 0.5
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _until_gone(reader: asyncio.StreamReader) -> None:
    """Read until the client closes or resets the connection."""
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass


async def _silent_after_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Says yes to the CONNECT, then takes the ClientHello and never answers."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    await _until_gone(reader)


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _until_gone(reader)


async def _closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
    await writer.drain()
    writer.close()
    await _until_gone(reader)


async def _bad_gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    await writer.drain()
    writer.close()
    await _until_gone(reader)


async def _against(handler: Handler, n: int) -> tuple[Outcome, float, str | None, bool]:
    """(outcome, seconds the request took, its detail, whether the client let go of the
    connection by the time the request returned, give or take a loop iteration)"""
    gone = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handler(reader, writer)
        gone.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = Target("127.0.0.1", port, 1, 1)  # the upstream ports are never dialled here
    started = time.monotonic()
    result = await one_request(n, target, client_tls(), TIMEOUT)
    took = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gone.wait(), 0.5)
    server.close()
    return result.outcome, took, result.detail, gone.is_set()


HTTPS = next(n for n in range(8) if plan(n)[1] == "https")
HTTP = next(n for n in range(8) if plan(n)[1] == "http")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("handler", "n", "outcome"),
    [
        (_silent_after_connect, HTTPS, Outcome.TIMEOUT),  # stuck in the TLS handshake
        (_silent, HTTP, Outcome.TIMEOUT),
        (_closes, HTTP, Outcome.CLOSED),
        (_bad_gateway, HTTPS, Outcome.STATUS_5XX),
    ],
    ids=["tls-handshake-never-answered", "silent", "closed-mid-body", "502"],
)
def test_a_misbehaving_peer_gives_an_error_kind_in_bounded_time(
    handler: Handler, n: int, outcome: Outcome
) -> None:
    got, took, detail, let_go = asyncio.run(_against(handler, n))
    assert got is outcome, detail
    assert took < TIMEOUT + CLOSE_TIMEOUT + 0.5
    assert let_go  # the client closed (or aborted) its connection: no descriptor left behind


def test_nothing_listening_is_connect_refused() -> None:
    async def go() -> Outcome:
        target = Target("127.0.0.1", free_port(), 1, 1)  # bound and released: nothing listens
        return (await one_request(HTTP, target, client_tls(), TIMEOUT)).outcome

    assert asyncio.run(go()) is Outcome.REFUSED
