"""Assembles mitmproxy with only the addons an egress proxy needs.

mitmproxy's ~30 default addons cost most of its per-request CPU (FIELD-NOTES) and several of them
would intercept TLS or rewrite traffic; this master runs the proxy server, our layering and our
decision addon, nothing else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mitmproxy import options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.master import Master

from sidecar.policy.store import PolicyStore
from sidecar.proxy.connections import Connections
from sidecar.proxy.decider import Decider
from sidecar.proxy.drain import Drain
from sidecar.proxy.headlimits import HeadLimits
from sidecar.proxy.http1 import install_http1_server
from sidecar.proxy.layering import Layering, install_transparent_start
from sidecar.proxy.listeners import Listeners, install_unredirected_filter
from sidecar.proxy.resolver import Resolver
from sidecar.proxy.tunnels import install_connect_after_upstream
from sidecar.reporter import Reporter


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


@dataclass(frozen=True)
class Proxy:
    master: Master
    listeners: Listeners
    drain: Drain


def build_master(config: ProxyConfig, store: PolicyStore, reporter: Reporter) -> Proxy:
    master = Master(options.Options(), event_loop=asyncio.get_running_loop())
    connections = Connections()
    listeners = Listeners()
    install_unredirected_filter()
    drain = Drain(connections)
    decider = Decider(
        store,
        reporter,
        Resolver(config.resolve_timeout, cache_ttl=config.dns_cache_ttl),
        connections,
        config.connect_timeout,
    )
    layering = Layering(connections, decider)
    install_transparent_start(config.first_byte_timeout, layering)
    install_connect_after_upstream()
    # Both listeners' HTTP/1 client side: bounded request heads, our own error answers.
    install_http1_server(config.head_limits, decider)
    # The drain before the decision addon: a request is in flight while it is being decided.
    master.addons.add(Proxyserver(), layering, drain, decider, listeners)
    master.options.update(
        confdir=config.confdir,
        # Lazy: nothing is connected upstream before the decision (FIELD-NOTES).
        connection_strategy="lazy",
        mode=[spec.mode("regular") for spec in config.explicit]
        + [spec.mode("transparent") for spec in config.transparent],
        # Headers are relayed as the client sent them; we are not a normalising proxy.
        validate_inbound_headers=True,
    )
    return Proxy(master, listeners, drain)
