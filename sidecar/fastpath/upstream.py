"""Connecting to a vetted upstream address, bounded in time, with a message that says what failed
(the span's error and error.type, the client's 502/504 come from it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from sidecar.telemetry.spans import error_type


class UpstreamError(Exception):
    """The upstream connect failed: ``str(err)`` says how, ``error_type`` is its category."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type(message)


async def dial[P: asyncio.BaseProtocol](
    address: str, port: int, factory: Callable[[], P], timeout: float
) -> tuple[asyncio.Transport, P]:
    """Open a TCP connection to ``address`` (an IP literal: names are resolved and vetted before)
    with ``factory``'s protocol; ``timeout`` <= 0 waits as long as the kernel does."""
    loop = asyncio.get_running_loop()
    connecting = loop.create_connection(factory, address, port)
    try:
        if timeout > 0:
            transport, protocol = await asyncio.wait_for(connecting, timeout)
        else:
            transport, protocol = await connecting
    except TimeoutError:
        raise UpstreamError(f"connect timed out after {timeout:g} s") from None
    except OSError as err:
        raise UpstreamError(str(err) or type(err).__name__) from err
    assert isinstance(transport, asyncio.Transport)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Small writes (a request head, a ClientHello) leave at once.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport, protocol
