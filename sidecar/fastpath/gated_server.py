"""A listening server whose accepts honour an AcceptGate, for event loops whose own accept step
cannot be overridden (uvloop's is in C): the listening sockets are ours, read with
``add_reader``; each accepted socket becomes the loop's own transport through
``connect_accepted_socket``.

At the gate's limit the listener's reader is removed, so further connections wait in the
kernel's listen queue (as on the selector loop, sidecar.fastpath.accept.GatedEventLoop).

Why not uvloop's own server: libuv accepts every queued connection in one go, calling the
protocol factory before each accept completes, so it cannot be stopped at a limit without
dropping a connection; and when accept fails for a reason other than EAGAIN (out of descriptors
past libuv's reserve, ENOBUFS, ENOMEM) uvloop closes the listening server for good. Here such an
accept is retried after a second. The cost, an accept and a task per connection in Python, is
measured in docs/benchmark.md (~7 % of a new tunnel's CPU).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from sidecar.fastpath.accept import AcceptGate, Slot, accept_batch, counted

log = logging.getLogger(__name__)


async def listening_sockets(
    loop: asyncio.AbstractEventLoop,
    host: str | Iterable[str] | None,
    port: int,
    *,
    family: int = 0,
    backlog: int,
    reuse_address: bool,
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host`` (None or "": every address) and
    ``port``, as asyncio's create_server makes them (v6 sockets v6-only)."""
    hosts: list[str | None]
    if host is None or host == "":
        hosts = [None]
    elif isinstance(host, str):
        hosts = [host]
    else:
        hosts = list(host)
    infos: list[tuple[Any, ...]] = []
    for h in hosts:
        infos += await loop.getaddrinfo(
            h, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    sockets: list[socket.socket] = []
    try:
        for af, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(af, kind, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as err:
                # asyncio's wording: the address is what a platform engineer looks for
                raise OSError(
                    err.errno,
                    f"error while attempting to bind on address {address!r}: {err.strerror}",
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class GatedServer(asyncio.AbstractServer):
    """asyncio.Server's interface over sockets read by the loop's ``add_reader``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gate: AcceptGate,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sockets: list[socket.socket],
        backlog: int,
    ) -> None:
        self._loop = loop
        self._gate = gate
        self._factory = protocol_factory
        self._sockets = sockets
        self._backlog = backlog
        self._serving = False
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- asyncio.AbstractServer --------------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._closed.is_set():
            return
        self._serving = True
        for sock in self._sockets:
            self._listen(sock)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._serving = False
        for sock in self._sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        self._sockets = []
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- accepting ---------------------------------------------------------------------------

    def _listen(self, sock: socket.socket) -> None:
        if self._serving and sock.fileno() != -1:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        accept_batch(
            self._loop,
            self._gate,
            sock,
            self._backlog,
            stop=lambda: self._loop.remove_reader(sock.fileno()),
            resume=lambda: self._listen(sock),
            accepted=self._accepted,
        )

    def _accepted(self, slot: Slot, conn: socket.socket, _: Any) -> None:
        task = self._loop.create_task(self._connect(slot, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, slot: Slot, conn: socket.socket) -> None:
        handed = False

        def factory() -> asyncio.BaseProtocol:
            nonlocal handed
            handed = True  # from here on the loop's transport owns the descriptor
            return counted(slot, self._factory)

        try:
            await self._loop.connect_accepted_socket(factory, conn)
        except BaseException as err:
            # The transport, if made, closed the descriptor itself: closing it here again
            # could close a connection that reused the number (uvloop #645's lesson).
            if handed:
                conn.detach()
            else:
                conn.close()
            if not slot.made:
                slot.release()
            if not isinstance(err, Exception):
                raise
            log.warning("a connection could not be set up", extra={"error": repr(err)})
