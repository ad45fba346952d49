"""The event loop the sidecar runs on, with the accept gate: uvloop (libuv) by default, asyncio's
own selector loop on request.

uvloop does a new tunnel's connect and each relayed read and write in C, and its accepts while
the accept gate has room (sidecar.fastpath.gated_server): measured here (docs/benchmark.md,
fourth round) a new tunnel takes 29 % less CPU than on asyncio's selector loop, a keep-alive
request 4 % less; accepting in C took 6-8 % more off a new tunnel (fifth round).
uvloop before 0.23 closed the descriptor of a socket whose create_connection(sock=) was cancelled
while the socket object kept it, so a later close hit whichever connection reused the number
(uvloop #645, #738): the requirement is >= 0.23, the fast path never hands uvloop a socket it
could be cancelled with (sidecar.fastpath.upstream connects by address), and a churn soak runs
on both loops (tests/proxy/test_churn_soak.py).
"""

from __future__ import annotations

import asyncio
import socket
from enum import StrEnum
from typing import Any

from sidecar.fastpath.accept import PROXY_LISTEN_BACKLOG, AcceptGate, GatedEventLoop


class LoopKind(StrEnum):
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


def new_loop(kind: LoopKind, gate: AcceptGate) -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind`` whose servers admit connections through ``gate``."""
    if kind is LoopKind.ASYNCIO:
        return GatedEventLoop(gate)
    return _gated_uvloop(gate)


def _gated_uvloop(gate: AcceptGate) -> asyncio.AbstractEventLoop:
    import uvloop  # only when chosen: the selector loop's sidecar never loads libuv

    from sidecar.fastpath.gated_server import GatedServer, NativeLane, listening_sockets

    class GatedUvLoop(uvloop.Loop):
        """uvloop whose plain TCP servers are GatedServers; the rest is uvloop's own."""

        async def create_server(  # type: ignore[override]
            self,
            protocol_factory: Any,
            host: Any = None,
            port: Any = None,
            *,
            family: int = 0,
            flags: int = socket.AI_PASSIVE,  # as asyncio's: listening addresses
            backlog: int = PROXY_LISTEN_BACKLOG,
            reuse_address: bool | None = None,
            start_serving: bool = True,
            **rest: Any,
        ) -> asyncio.AbstractServer:
            # anything else (TLS servers, given sockets, reuse_port): uvloop's, ungated; the
            # sidecar makes none of these
            if any(rest.values()):
                return await super().create_server(
                    protocol_factory,
                    host,
                    port,
                    family=family,
                    backlog=backlog,
                    reuse_address=reuse_address,
                    start_serving=start_serving,
                    **rest,
                )
            sockets = await listening_sockets(
                self,
                host,
                port,
                family=family,
                backlog=backlog,
                reuse_address=reuse_address is not False,
            )

            def serve(factory: Any, sock: socket.socket) -> Any:
                return uvloop.Loop.create_server(self, factory, sock=sock, backlog=backlog)

            server = GatedServer(
                self,
                gate,
                protocol_factory,
                sockets,
                backlog,
                native=NativeLane.for_backlog(serve, backlog),
            )
            if start_serving:
                await server.start_serving()
            return server

    loop: asyncio.AbstractEventLoop = GatedUvLoop()
    return loop
