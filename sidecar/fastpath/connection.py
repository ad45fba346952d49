"""A client connection of the front door, and the phases that handle it one after the other.

Each accepted transport keeps one protocol object for its whole life (the open-file gate counts
that object's connection_lost); what reads its bytes changes as the connection goes on — an
HTTP/1 reader, a tunnel being set up, a relay, or mitmproxy's stream reader after a handover.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from sidecar.record import Capture

if TYPE_CHECKING:
    from sidecar.fastpath.config import ListenSpec

log = logging.getLogger(__name__)


class Phase(Protocol):
    """What handles a client connection's events for a while (asyncio.Protocol's methods)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class Cuttable(Protocol):
    def cut(self, message: str) -> None:
        """The sidecar is stopping: end what is in flight with ``message`` and close."""


class ClientConnection(asyncio.Protocol):
    """The protocol of one accepted client transport; delegates to its current phase."""

    # No __slots__: the open-file gate (sidecar.fastpath.accept) wraps connection_made and
    # connection_lost on the instance.

    def __init__(
        self,
        capture: Capture,
        listen: ListenSpec,
        on_made: Callable[[ClientConnection], None],
        on_lost: Callable[[ClientConnection], None],
    ) -> None:
        self.capture = capture
        self.listen = listen
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None  # the client's address, read when the connection is made
        self.phase: Phase | None = None
        # Something is in flight (a request being decided or answered, a tunnel, a stream): a
        # drain waits for it; an idle connection is closed at once.
        self.busy = False
        self.handed_over = False  # mitmproxy's now: its own drain tracks it
        self.eof = False
        self.closed = False
        self.cutter: Cuttable | None = None
        self._on_made = on_made
        self._on_lost = on_lost

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not registered as asyncio.Transport's subclass)
        self.transport = cast(asyncio.Transport, transport)
        self.peer = peer_host(transport)
        self._on_made(self)  # sets the first phase

    def data_received(self, data: bytes) -> None:
        if self.phase is not None:
            self.phase.data_received(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.phase is not None:
            return self.phase.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        try:
            if self.phase is not None:
                self.phase.connection_lost(exc)
        finally:
            self._on_lost(self)

    def pause_writing(self) -> None:
        if self.phase is not None:
            self.phase.pause_writing()

    def resume_writing(self) -> None:
        if self.phase is not None:
            self.phase.resume_writing()

    # -- for phases -------------------------------------------------------------------------

    def switch(self, phase: Phase) -> None:
        self.phase = phase

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def peer_host(transport: asyncio.BaseTransport) -> str | None:
    """The address of ``transport``'s peer; None when it is not known or the connection is gone
    (uvloop's get_extra_info raises AttributeError on a closed transport, asyncio's does not)."""
    try:
        peername = transport.get_extra_info("peername")
    except (AttributeError, OSError):
        return None
    return str(peername[0]) if peername else None
