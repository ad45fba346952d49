"""The explicit listener's connections: the first request head is read here (bounded as the
reference engine bounds it: 414/431/408), then a CONNECT becomes a tunnel (sidecar.fastpath.
tunnel) and anything else goes to the plain-HTTP reader with every byte read so far."""

from __future__ import annotations

import asyncio

from sidecar.fastpath import http
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.refusal import refuse_head
from sidecar.fastpath.services import Services
from sidecar.fastpath.tunnel import Tunnel
from sidecar.proxy.headlimits import HeadRejection, HeadScanner, timeout_rejection
from sidecar.wire.connect_head import HeadError, is_connect, parse_connect_head


def start(conn: ClientConnection, services: Services) -> None:
    conn.switch(FirstHead(conn, services))


class FirstHead:
    """Reads the first request head of an explicit-proxy connection."""

    __slots__ = ("_buf", "_conn", "_scanner", "_services", "_timer")

    def __init__(self, conn: ClientConnection, services: Services) -> None:
        self._conn = conn
        self._services = services
        # Bytes while the head came in one piece (the usual case: nothing copied), a bytearray
        # once it arrives in several.
        self._buf: bytes | bytearray = b""
        self._scanner = HeadScanner(services.config.head_limits)
        self._timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if not self._buf:
            self._buf = data
        elif isinstance(self._buf, bytes):
            self._buf = bytearray(self._buf) + data
        else:
            self._buf += data
        scanner = self._scanner
        rejection = scanner.scan(self._buf)
        if rejection is not None:
            self._refuse(rejection)
            return
        if not scanner.complete:
            if scanner.started and self._timer is None:
                # From the head's first byte (empty lines before it do not count).
                self._timer = asyncio.get_running_loop().call_later(
                    scanner.limits.timeout, self._timed_out
                )
            return
        self._stop_timer()
        buf, conn, services = self._buf, self._conn, self._services
        if not is_connect(buf):
            http.start_explicit(conn, services, bytes(buf))
            return
        end = scanner.scanned  # just past the head's blank line
        try:
            request = parse_connect_head(bytes(buf[:end]))
        except HeadError as err:
            self._refuse(HeadRejection(400, err.reason, err.detail))
            return
        snap = services.store.get()
        inspecting = snap.inspection(request.host, request.port)
        if inspecting is not None and services.config.inspection_available:
            # HTTPS inspection (inspect: true) is mitmproxy's: it reads the CONNECT again.
            services.second_tier.hand_over(conn, bytes(buf), "inspect")
            return
        # What follows the head is the start of the tunnel's first flight.
        Tunnel(conn, services, request, bytes(buf[end:])).open(snap, inspecting)

    def eof_received(self) -> bool | None:
        # Closed before a whole head arrived: nothing to decide (as the reference engine does).
        self._stop_timer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _timed_out(self) -> None:
        self._timer = None
        if not self._conn.closed and not self._scanner.complete:
            self._refuse(timeout_rejection(self._scanner.limits))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, rejection: HeadRejection) -> None:
        self._stop_timer()
        refuse_head(self._conn, self._services, rejection, bytes(self._buf).lstrip(b"\r\n"))
