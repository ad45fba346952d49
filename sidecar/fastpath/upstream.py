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
    with ``factory``'s protocol; ``timeout`` <= 0 waits as long as the kernel does.

    The socket is connected here rather than by ``loop.create_connection(host, port)``: that
    path (address checks, a future per connect, a timeout handle even where the kernel answers
    at once, as it does on loopback and in-cluster) was a third of a new tunnel's CPU. Errors
    read as asyncio's do (``Connect call failed (address, port)``)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise UpstreamError(str(err) or type(err).__name__) from err
    try:
        sock.setblocking(False)
        try:
            sock.connect((address, port))
        except BlockingIOError:
            await _connected(loop, sock, (address, port), timeout)
        # asyncio's TCP transports set TCP_NODELAY themselves: small writes leave at once.
        transport, protocol = await loop.create_connection(factory, sock=sock)
    except TimeoutError:
        sock.close()
        raise UpstreamError(f"connect timed out after {timeout:g} s") from None
    except OSError as err:
        sock.close()
        raise UpstreamError(str(err) or type(err).__name__) from err
    except BaseException:
        sock.close()  # cancelled: the client left or the sidecar is stopping
        raise
    assert isinstance(transport, asyncio.Transport)
    return transport, protocol


async def _connected(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: tuple[str, int],
    timeout: float,
) -> None:
    """Wait for a non-blocking connect in progress to finish; OSError as asyncio words it."""
    done: asyncio.Future[None] = loop.create_future()

    def writable() -> None:
        if not done.done():
            done.set_result(None)

    fd = sock.fileno()
    loop.add_writer(fd, writable)
    try:
        # asyncio.timeout, not wait_for: no second task per connect (a new tunnel's CPU).
        async with asyncio.timeout(timeout if timeout > 0 else None):
            await done
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {address}")
