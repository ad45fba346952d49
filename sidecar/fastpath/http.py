"""Plain HTTP/1 requests on the fast path (both captures)."""

from __future__ import annotations

from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.services import Services


def start_explicit(conn: ClientConnection, services: Services, data: bytes) -> None:
    """An explicit-proxy connection whose first request is not a CONNECT; ``data``: what was
    read from it so far (at least that request's head)."""
    services.second_tier.hand_over(conn, data, "plain HTTP")


def start_transparent(
    conn: ClientConnection, services: Services, original: tuple[str, int], data: bytes
) -> None:
    """A redirected connection whose first flight is an HTTP request line; ``original``: the
    destination the app dialled; ``data``: what was read so far."""
    services.second_tier.hand_over(conn, data, "plain HTTP")
