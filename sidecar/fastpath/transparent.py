"""The transparent listener's connections."""

from __future__ import annotations

from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.services import Services


def start(conn: ClientConnection, services: Services) -> None:
    services.second_tier.hand_over(conn, b"", "transparent connection")
