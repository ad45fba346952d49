"""Assembles mitmproxy with only the addons an egress proxy needs: the second tier.

mitmproxy does not listen itself: the front door (sidecar.fastpath) owns the listeners and
hands it the connections that need its depth (and, with ``--engine mitmproxy``, every one), with
the bytes already read. Its ~30 default addons cost most of its per-request CPU (FIELD-NOTES) and
several of them would intercept TLS or rewrite traffic; this master runs our layering and our
decision addon, nothing else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.master import Master
from mitmproxy.proxy.mode_servers import ServerInstance

from sidecar.fastpath.config import ListenSpec, ProxyConfig
from sidecar.policy.store import PolicyStore
from sidecar.proxy.connections import Connections
from sidecar.proxy.decider import Decider
from sidecar.proxy.drain import Drain
from sidecar.proxy.http1 import install_http1_server
from sidecar.proxy.inspect_tls import InspectTls, upstream_trust_file
from sidecar.proxy.layering import Layering, install_transparent_start
from sidecar.proxy.listeners import install_unredirected_filter
from sidecar.proxy.resolver import Resolver
from sidecar.proxy.tunnels import install_connect_after_upstream
from sidecar.reporter import Reporter


class Running:
    """Set once mitmproxy's addons have all started (its ``running`` hook)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()


@dataclass(frozen=True)
class Proxy:
    master: Master
    proxyserver: Proxyserver
    drain: Drain
    running: Running

    def instance(self, kind: str, spec: ListenSpec) -> ServerInstance:  # type: ignore[type-arg]
        """mitmproxy's server for one of our listeners (never started: it only handles streams
        the front door gives it). ``kind``: "regular" or "transparent"."""
        return ServerInstance.make(spec.mode(kind), self.proxyserver)


def build_master(config: ProxyConfig, store: PolicyStore, reporter: Reporter) -> Proxy:
    master = Master(options.Options(), event_loop=asyncio.get_running_loop())
    connections = Connections()
    install_unredirected_filter()
    drain = Drain(connections)
    decider = Decider(
        store,
        reporter,
        Resolver(config.resolve_timeout, cache_ttl=config.dns_cache_ttl, learned=config.learned),
        connections,
        config.connect_timeout,
        inspection=config.inspection,
    )
    layering = Layering(connections, decider)
    install_transparent_start(config.first_byte_timeout, layering)
    install_connect_after_upstream()
    # Both listeners' HTTP/1 client side: bounded request heads, our own error answers.
    install_http1_server(config.head_limits, decider)
    proxyserver = Proxyserver()
    running = Running()
    # The drain before the decision addon: a request is in flight while it is being decided.
    master.addons.add(proxyserver, layering, drain, decider, running)
    trust: dict[str, str] = {}
    if config.inspection is not None and config.inspection.available:
        # Only connections the layering inspects ever reach this addon's TLS hooks.
        confdir = Path(config.confdir).expanduser()
        master.addons.add(InspectTls(config.inspection, confdir, connections))
        trust["ssl_verify_upstream_trusted_ca"] = upstream_trust_file(config.inspection, confdir)
    master.options.update(
        **trust,
        confdir=config.confdir,
        # Lazy: nothing is connected upstream before the decision (FIELD-NOTES).
        connection_strategy="lazy",
        mode=[],  # the front door listens; mitmproxy serves the streams it is handed
        # Headers are relayed as the client sent them; we are not a normalising proxy.
        validate_inbound_headers=True,
    )
    return Proxy(master, proxyserver, drain, running)
