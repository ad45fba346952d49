"""What the proxy learned about each client connection (shared by layering and decision)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mitmproxy import connection

from sidecar.record import DecisionRecord


class Kind(StrEnum):
    PENDING = "pending"  # transparent, protocol not known yet
    HTTP = "http"  # requests decided one by one
    TLS = "tls"  # transparent TLS: decided on the SNI when connecting upstream
    TCP = "tcp"  # transparent raw TCP (or TLS without SNI): decided on the original address
    TUNNEL = "tunnel"  # the inside of an allowed CONNECT: already decided


@dataclass(slots=True)
class Pending:
    """A decision reported once its outcome is known (upstream connect, a tunnel's first flight):
    one span, started when the decision was made, carrying the final attributes."""

    record: DecisionRecord
    start_ns: int


@dataclass(slots=True)
class ConnectionInfo:
    kind: Kind = Kind.PENDING
    sni: str | None = None
    original: tuple[str, int] | None = None  # transparent: where the app was connecting
    # (address, port) pairs a decision vetted for this client: server_connect lets only these out.
    vetted: set[tuple[str, int]] = field(default_factory=set)
    # Allowed streams and tunnels whose decision waits for the upstream connect, by address.
    awaiting: dict[tuple[str, int], Pending] = field(default_factory=dict)
    # Transparent, to an address a cidr rule allows: the upstream is opened before the client's
    # first flight (a server may speak first); the client's bytes are held until it is decided.
    held: bool = False
    held_error: str | None = None  # that early connect failed
    # An allowed CONNECT whose upstream is up: decided for good on the tunnel's first flight.
    tunnel: Pending | None = None
    # HTTPS inspection (inspect: true): the rule that inspects this connection's host (set
    # whether or not the CA is available: without it the host is denied), the host the leaf
    # certificate and the upstream's SNI name, the channel's decision (reported once the
    # client's TLS handshake succeeds or fails) and an upstream TLS failure (each request is
    # then answered 502 without being sent).
    inspect_rule: str | None = None
    inspect_host: str | None = None
    inspect_channel: Pending | None = None
    upstream_tls_error: str | None = None


class Connections:
    """Per-client-connection state, created on first use and dropped on disconnect."""

    def __init__(self) -> None:
        self._by_id: dict[str, ConnectionInfo] = {}

    def get(self, client: connection.Client) -> ConnectionInfo:
        info = self._by_id.get(client.id)
        if info is None:
            info = self._by_id[client.id] = ConnectionInfo()
        return info

    def client_disconnected(self, client: connection.Client) -> None:
        self._by_id.pop(client.id, None)
