"""What the proxy listens on and how long it waits: shared by the front door and mitmproxy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.inspection import InspectionCA
from sidecar.policy.dns import LearnedAddresses
from sidecar.proxy.headlimits import HeadLimits


@dataclass(frozen=True)
class ListenSpec:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        """``HOST:PORT`` with a bare IPv6 host allowed (``::1:15002``, as mitmproxy spells it)."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))

    def mode(self, kind: str) -> str:
        return f"{kind}@{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def overlaps(self, other: ListenSpec) -> bool:
        """Whether both cannot be bound at once: one port, and one host or a wildcard of the
        same family (``0.0.0.0`` covers every IPv4 address, ``::`` every IPv6 one)."""
        if self.port != other.port or (":" in self.host) != (":" in other.host):
            return False
        return self.host == other.host or {self.host, other.host} & _WILDCARDS != set()


_WILDCARDS = frozenset({"0.0.0.0", "::"})


class ListenClashError(ValueError):
    """Two listeners were given one address: the second would fail to bind at start."""


def check_distinct(named: Sequence[tuple[str, ListenSpec]]) -> None:
    """Raises ListenClashError naming the first two listeners (by flag) that share an address,
    before anything binds, so that the sidecar refuses to start instead of running without
    one of them."""
    for i, (name, spec) in enumerate(named):
        for other_name, other in named[:i]:
            if spec.overlaps(other):
                raise ListenClashError(
                    f"{other_name} {other} and {name} {spec} are the same address: "
                    "give each listener a port of its own"
                )


@dataclass(frozen=True)
class ProxyConfig:
    explicit: tuple[ListenSpec, ...]
    transparent: tuple[ListenSpec, ...]
    confdir: str
    resolve_timeout: float = 5.0
    dns_cache_ttl: float = 5.0
    # Transparent: the client's first flight must be in by then; a silent client is then
    # decided as raw TCP, a partial first flight refused.
    first_byte_timeout: float = 10.0
    connect_timeout: float = 10.0  # an upstream connect that takes longer fails (CONNECT: 504)
    head_limits: HeadLimits = field(default_factory=HeadLimits)  # plain-HTTP request heads
    # Addresses the pod learned from the DNS listener (raw TCP by host rules); None: no DNS
    # listener. State shared by both engines' resolvers, not a setting: not compared.
    learned: LearnedAddresses | None = field(default=None, compare=False)
    # HTTPS inspection's CA (sidecar.inspection), read at start; None: not configured (tests).
    inspection: InspectionCA | None = field(default=None, compare=False)

    @property
    def inspection_available(self) -> bool:
        return self.inspection is not None and self.inspection.available
