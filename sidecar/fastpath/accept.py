"""Accepting client connections: never more than the open-file limit leaves room for.

The soft open-file limit is raised to the hard one at start; accepts are gated so that each
admitted client (and the upstream connection it may open) fits, further ones wait in the listen
queue instead of failing with EMFILE.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from asyncio.constants import ACCEPT_RETRY_DELAY
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS = 10.0  # at most one "at the limit" line per interval, with counts
MIN_HEADROOM_FDS = 64  # health probes, DNS, the API server, OTLP export, lazy imports


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """RLIMIT_NOFILE at start: the soft limit in force and what it was raised from."""

    soft: int
    hard: int
    raised_from: int | None

    @classmethod
    def raise_soft_limit(cls) -> OpenFiles:
        """Soft limit up to the hard one: runtimes often start containers at 1024 soft."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard in (resource.RLIM_INFINITY, soft):
            return cls(soft, hard, None)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as err:
            log.warning("could not raise the open-file limit", extra={"error": str(err)})
            return cls(soft, hard, None)
        return cls(hard, hard, soft)


def connection_limit(soft_limit: int, open_now: int) -> int:
    """Client connections the proxy may hold: each may use one upstream connection as well,
    and a headroom of descriptors stays free for everything else the process does."""
    headroom = max(MIN_HEADROOM_FDS, soft_limit // 16)
    return max(1, (soft_limit - open_now - headroom) // 2)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Slot:
    """One admitted client connection; released once, when its transport is gone."""

    __slots__ = ("_gate", "made", "released")

    def __init__(self, gate: AcceptGate) -> None:
        self._gate = gate
        self.made = False
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gate.release()


class AcceptGate:
    """Admits at most ``limit`` client connections to the proxy listeners at a time.

    At the limit a listener stops accepting; new connections wait in its kernel listen queue
    (as with HAProxy's maxconn) and are accepted as open ones close. Connections already open
    keep working, and the process keeps the file descriptors that health probes and the rest
    need: without this, accept() failed with EMFILE and Python's accept loop logged it tens of
    thousands of times (CPython gh-151615), and the health listener could not accept at all.
    """

    def __init__(self, limit: int, *, log_interval: float = LOG_INTERVAL_SECONDS) -> None:
        self.limit = limit
        self.open = 0
        self._parked: list[Callable[[], None]] = []
        self._log_interval = log_interval
        self._last_log: dict[str, float] = {}
        self._since_log: dict[str, int] = {}

    def room(self) -> int:
        return self.limit - self.open

    def admit(self) -> Slot:
        self.open += 1
        return Slot(self)

    def release(self) -> None:
        self.open -= 1
        if self._parked and self.room() > 0:
            parked, self._parked = self._parked, []
            for resume in parked:
                resume()

    def park(self, resume: Callable[[], None]) -> None:
        self._parked.append(resume)
        self.note(
            "proxy at its connection limit: new connections wait in the listen queue",
            limit=self.limit,
        )

    def note(self, message: str, **extra: Any) -> None:
        """Log ``message`` at most once per interval, with how often it happened meanwhile."""
        now = time.monotonic()
        self._since_log[message] = self._since_log.get(message, 0) + 1
        last = self._last_log.get(message)
        if last is not None and now - last < self._log_interval:
            return
        self._last_log[message] = now
        times, self._since_log[message] = self._since_log[message], 0
        log.warning(message, extra={**extra, "times": times, "interval_s": self._log_interval})


# accept() failing for want of descriptors or kernel memory: retried after a pause.
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def accept_batch(
    loop: asyncio.AbstractEventLoop,
    gate: AcceptGate,
    sock: socket.socket,
    backlog: int,
    *,
    stop: Callable[[], object],
    resume: Callable[[], None],
    accepted: Callable[[Slot, socket.socket, Any], None],
) -> None:
    """One readiness of a listening socket, on either loop: up to ``backlog`` connections
    accepted while ``gate`` has room, each handed to ``accepted`` with its slot and address. At
    the limit the socket is no longer read (``stop``) until the gate calls ``resume``; out of
    descriptors despite the gate (something else used them), it is retried in a second and
    this round stops (asyncio's own loop went on, gh-151615)."""
    for _ in range(backlog):
        if gate.room() <= 0:
            stop()
            gate.park(resume)
            return
        try:
            conn, addr = sock.accept()
            conn.setblocking(False)
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno not in OUT_OF_FDS:
                raise
            gate.note("out of file descriptors while accepting, retrying in 1 s", error=str(exc))
            stop()
            loop.call_later(ACCEPT_RETRY_DELAY, resume)
            return
        accepted(gate.admit(), conn, addr)


PROXY_LISTEN_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn (4096 by default)


class GatedEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop whose TCP accept loop honours an AcceptGate.

    Overrides the loop's private accept step (unchanged from Python 3.12 to 3.13) because asyncio
    offers no public way to pause a listening socket; mitmproxy creates its servers itself.
    """

    def __init__(self, gate: AcceptGate) -> None:
        super().__init__()
        self.gate = gate

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        # mitmproxy leaves asyncio's backlog of 100: a burst of connects (an app filling its
        # connection pool) past it waits 1 s and more in SYN retransmits.
        kwargs.setdefault("backlog", PROXY_LISTEN_BACKLOG)
        return await super().create_server(*args, **kwargs)

    def _accept_connection(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        sslcontext: Any = None,
        server: Any = None,
        backlog: int = 100,
        *rest: Any,
    ) -> None:
        def resume() -> None:
            if sock.fileno() != -1 and (server is None or server.is_serving()):
                self._start_serving(  # type: ignore[attr-defined]
                    protocol_factory, sock, sslcontext, server, backlog, *rest
                )

        def accepted(slot: Slot, conn: socket.socket, addr: Any) -> None:
            peer = {"peername": addr}
            if sslcontext is None:
                self._accept_plain(slot, protocol_factory, conn, peer, server)
            else:
                self.create_task(
                    self._accept_gated(
                        slot, protocol_factory, conn, (peer, sslcontext, server, *rest)
                    )
                )

        accept_batch(
            self,
            self.gate,
            sock,
            backlog,
            stop=lambda: self._remove_reader(sock.fileno()),  # type: ignore[attr-defined]
            resume=resume,
            accepted=accepted,
        )

    def _accept_plain(
        self,
        slot: Slot,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        conn: socket.socket,
        extra: dict[str, Any],
        server: Any,
    ) -> None:
        """A plain TCP connection's transport, made here: asyncio's _accept_connection2 does the
        same in a task of its own per connection, only to await the transport's waiter (a
        tenth of a new tunnel's CPU). connection_made comes on the next loop turn, as there."""
        try:
            self._make_socket_transport(  # type: ignore[attr-defined]
                conn, counted(slot, protocol_factory), extra=extra, server=server
            )
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            # As asyncio's own accept step: this connection is dropped, the listener goes on.
            conn.close()
            if not slot.made:
                slot.release()
            log.exception("a connection could not be set up")

    async def _accept_gated(
        self,
        slot: Slot,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        conn: socket.socket,
        args: tuple[Any, ...],  # extra, sslcontext, server, then asyncio's timeouts
    ) -> None:
        def factory() -> asyncio.BaseProtocol:
            return counted(slot, protocol_factory)

        try:
            await self._accept_connection2(factory, conn, *args)  # type: ignore[attr-defined]
        finally:
            if not slot.made:  # the transport never came up: no connection_lost will follow
                slot.release()


def counted(
    slot: Slot, protocol_factory: Callable[[], asyncio.BaseProtocol]
) -> asyncio.BaseProtocol:
    """``protocol_factory``'s protocol, its connection held in ``slot`` until it is lost."""
    protocol = protocol_factory()
    made, lost = protocol.connection_made, protocol.connection_lost

    def connection_made(transport: asyncio.BaseTransport) -> None:
        slot.made = True
        made(transport)

    def connection_lost(exc: Exception | None) -> None:
        try:
            lost(exc)
        finally:
            slot.release()

    protocol.connection_made = connection_made  # type: ignore[method-assign]
    protocol.connection_lost = connection_lost  # type: ignore[method-assign]
    return protocol
