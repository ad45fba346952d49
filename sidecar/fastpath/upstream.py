"""Connecting to a vetted upstream address, bounded in time, with a message that says what failed
(the span's error and error.type, the client's 502/504 come from it)."""

from __future__ import annotations

import asyncio
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
    try:
        # asyncio.timeout, not wait_for: no second task per connect (a new tunnel's CPU).
        async with asyncio.timeout(timeout if timeout > 0 else None):
            transport, protocol = await loop.create_connection(factory, address, port)
    except TimeoutError:
        raise UpstreamError(f"connect timed out after {timeout:g} s") from None
    except OSError as err:
        raise UpstreamError(str(err) or type(err).__name__) from err
    assert isinstance(transport, asyncio.Transport)
    # asyncio's TCP transports set TCP_NODELAY themselves: small writes leave at once.
    return transport, protocol
