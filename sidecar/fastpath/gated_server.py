"""A listening server whose accepts honour an AcceptGate, for event loops whose own accept step
cannot be overridden (uvloop's is in C). The listening sockets are ours; connections reach the
loop by one of two lanes:

- the native lane, while the gate has plenty of room: a uvloop server on a duplicate of each
  listening socket accepts in C (libuv), with no Python accept, socket object or task per
  connection: measured here, 8 % of a new tunnel's CPU (docs/benchmark.md, fifth round);
- the gated lane, near the limit: the sockets are read with ``add_reader``, accepted here and
  handed to the loop with ``connect_accepted_socket``; at the limit the reader is removed, so
  further connections wait in the kernel's listen queue (as on the selector loop,
  sidecar.fastpath.accept.GatedEventLoop).

Why the native lane cannot run up to the limit: libuv accepts every queued connection in one go,
calling the protocol factory after each accept, so it cannot stop at a limit. So the native lane
is left while the gate's room is within two listen queues (``NativeLane.reserve``: one drain of
a full queue, and what arrives meanwhile) and taken again above twice that. Closing a duplicate
leaves the listening socket, and the connections queued on it, as they were.

Out of descriptors despite the gate (used by something it does not count; its headroom is what
keeps this away): in the native lane libuv sheds what is queued at that moment (its EMFILE
reserve trick accepts and closes it) and goes on, where the gated lane leaves it queued and
retries in a second. When accept fails otherwise (ENOBUFS, ENOMEM, EMFILE with libuv's reserve
gone), uvloop closes the listener without a word: a watchdog looks at the native listeners every
second and then goes back to the gated lane for good, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sidecar.fastpath.accept import AcceptGate, Slot, accept_batch, counted

log = logging.getLogger(__name__)

WATCHDOG_SECONDS = 1.0

# A uvloop server accepting on a socket (a duplicate of ours) in C: (protocol_factory, sock).
NativeServe = Callable[[Callable[[], asyncio.BaseProtocol], socket.socket], Awaitable[Any]]


class Lane(StrEnum):
    NATIVE = "native"  # accepted by the loop in C
    GATED = "gated"  # accepted here, one gate check per connection


def somaxconn() -> int:
    """The kernel's cap on a listen queue (net.core.somaxconn)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4096  # Linux's default since 5.4


@dataclass(frozen=True, slots=True)
class NativeLane:
    """When a server accepts in C: ``serve`` makes the loop's own server on a socket, used while
    the gate's room is above ``reserve`` (left at or below it, taken again above twice it)."""

    serve: NativeServe
    reserve: int

    @classmethod
    def for_backlog(cls, serve: NativeServe, backlog: int) -> NativeLane:
        # One drain of a full listen queue admits up to its length (the kernel caps the backlog
        # at somaxconn), plus what arrives meanwhile: two queues' worth.
        return cls(serve, 2 * max(1, min(backlog, somaxconn())))


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
        *,
        native: NativeLane | None = None,
    ) -> None:
        self._loop = loop
        self._gate = gate
        self._factory = protocol_factory
        self._sockets = sockets
        self._backlog = backlog
        self._serving = False
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._native = native
        self._native_servers: list[Any] = []
        self._switching = False  # a native lane being set up, or being left
        self._watchdog: asyncio.TimerHandle | None = None
        self.lane = Lane.GATED

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
        self._maybe_native()

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._serving = False
        self._close_native()
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
        if self._serving and self.lane is Lane.GATED and sock.fileno() != -1:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        self._maybe_native()
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

    # -- the native lane -----------------------------------------------------------------------

    def _maybe_native(self) -> None:
        """Take the native lane when the gate has room for it again (from the gated lane)."""
        native = self._native
        if (
            native is None
            or self.lane is Lane.NATIVE
            or self._switching
            or not self._serving
            or self._gate.room() <= 2 * native.reserve
        ):
            return
        self._switching = True
        task = self._loop.create_task(self._start_native(native))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_native(self, native: NativeLane) -> None:
        servers: list[Any] = []
        dup: socket.socket | None = None
        try:
            for sock in self._sockets:
                dup = sock.dup()
                servers.append(await native.serve(self._native_factory, dup))
                dup = None  # the loop's server owns it
        except Exception as err:
            if dup is not None:
                dup.close()
            for server in servers:
                server.close()
            self._native = None  # the gated lane from now on
            log.warning(
                "the event loop's own server could not be started: accepting in Python",
                extra={"error": repr(err)},
            )
            return
        finally:
            self._switching = False
        if not self._serving or self._gate.room() <= native.reserve:
            for server in servers:
                server.close()  # closed, or filled up, meanwhile
            return
        # The gated lane accepted meanwhile; from here on only the loop does.
        self.lane = Lane.NATIVE
        self._native_servers = servers
        for sock in self._sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
        self._watchdog = self._loop.call_later(WATCHDOG_SECONDS, self._watch)

    def _native_factory(self) -> asyncio.BaseProtocol:
        # libuv has accepted the connection already: it is admitted whatever the room, and the
        # lane is left once the room is within the reserve.
        slot = self._gate.admit()
        native = self._native
        if (
            native is not None
            and not self._switching
            and self.lane is Lane.NATIVE
            and self._gate.room() <= native.reserve
        ):
            self._switching = True
            self._loop.call_soon(self._to_gated)
        return counted(slot, self._factory)

    def _to_gated(self) -> None:
        self._switching = False
        if self.lane is Lane.NATIVE:
            self._close_native()
            for sock in self._sockets:
                self._listen(sock)

    def _watch(self) -> None:
        """uvloop closes a listener whose accept failed (EMFILE, ENOBUFS...) without a word."""
        self._watchdog = None
        if self.lane is not Lane.NATIVE:
            return
        alive = all(
            sock is not None and sock.fileno() != -1
            for server in self._native_servers
            for sock in (server.sockets or [None])
        )
        if alive:
            self._watchdog = self._loop.call_later(WATCHDOG_SECONDS, self._watch)
            return
        log.warning(
            "the event loop closed a listener after a failed accept: accepting in Python from "
            "now on",
            extra={"listen": [str(sock.getsockname()) for sock in self._sockets]},
        )
        self._native = None
        self._to_gated()

    def _close_native(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        servers, self._native_servers = self._native_servers, []
        for server in servers:
            server.close()  # its duplicate only: the listening socket and its queue stay
        self.lane = Lane.GATED
