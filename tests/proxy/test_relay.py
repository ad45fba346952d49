"""sidecar.fastpath.relay on both loops, over real sockets: what a started relay passes on, and
that each chunk goes to the other side's write with no frame of ours between (the relay's
per-chunk cost: callgrind counted 10.0k instructions a request through a kept-alive tunnel with
the two delegating frames, 7.5k without)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from sidecar.fastpath.accept import AcceptGate
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.loops import LoopKind, new_loop
from sidecar.fastpath.relay import Relay, Upstream
from sidecar.record import Capture


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), 5)
        if not chunk:
            break
        out += chunk
    return out


async def _relayed() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    app, client_end = socket.socketpair()  # the app's connection, accepted by the sidecar
    server_end, server = socket.socketpair()  # the sidecar's upstream connection
    for s in (app, server):
        s.setblocking(False)
    ended: list[bool] = []
    conn = ClientConnection(
        Capture.EXPLICIT, cast(Any, None), on_made=lambda c: None, on_lost=lambda c: None
    )
    client, _ = await loop.connect_accepted_socket(lambda: conn, client_end)
    upstream = Upstream()
    upstream_transport, _ = await loop.connect_accepted_socket(lambda: upstream, server_end)
    relay = Relay(conn, upstream, on_end=lambda: ended.append(True))
    relay.start(to_server=b"first flight|", to_client=b"held|")
    out: dict[str, Any] = {
        "client_piped": conn.data_received == upstream_transport.write,
        "upstream_piped": upstream.data_received == client.write,
    }
    await loop.sock_sendall(app, b"ping")
    out["server_got"] = await _read_exactly(server, len(b"first flight|ping"))
    await loop.sock_sendall(server, b"pong" * 10_000)
    out["app_got"] = await _read_exactly(app, len(b"held|") + 40_000)
    app.shutdown(socket.SHUT_WR)  # a half-close goes on as one
    out["server_eof"] = await asyncio.wait_for(loop.sock_recv(server, 10), 5)
    await loop.sock_sendall(server, b"after the app's EOF")
    out["app_after_eof"] = await _read_exactly(app, len(b"after the app's EOF"))
    server.close()
    await asyncio.sleep(0.1)
    out["ended"] = ended
    app.close()
    return out


@pytest.mark.parametrize("kind", list(LoopKind))
def test_a_started_relay_hands_each_chunk_straight_to_the_other_side(kind: LoopKind) -> None:
    with asyncio.Runner(loop_factory=lambda: new_loop(kind, AcceptGate(10))) as runner:
        out = runner.run(_relayed())
    assert out["client_piped"] and out["upstream_piped"]
    assert out["server_got"] == b"first flight|ping"  # the held first flight goes first
    assert out["app_got"] == b"held|" + b"pong" * 10_000
    assert out["server_eof"] == b""
    assert out["app_after_eof"] == b"after the app's EOF"
    assert out["ended"] == [True]
