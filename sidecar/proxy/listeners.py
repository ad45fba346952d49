"""Watches the proxy's listeners: ready only when every one accepts connections."""

from __future__ import annotations

import logging

from mitmproxy import ctx
from mitmproxy.addons.proxyserver import Proxyserver

log = logging.getLogger(__name__)


class Listeners:
    def __init__(self) -> None:
        self.all_running = False
        self.failed: list[str] = []
        self.addresses: list[str] = []

    def running(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        assert isinstance(proxyserver, Proxyserver)
        servers = list(proxyserver.servers)
        self.failed = [
            f"{server.mode.full_spec}: {server.last_exception}"
            for server in servers
            if not server.is_running
        ]
        self.addresses = [
            f"{server.mode.type_name}@{addr[0]}:{addr[1]}"
            for server in servers
            for addr in server.listen_addrs
        ]
        self.all_running = bool(servers) and not self.failed
        if self.failed:
            # Not logged at ERROR level: an addon's startup ERROR makes mitmproxy exit abruptly.
            log.warning("proxy listeners failed to start", extra={"failed": "; ".join(self.failed)})
            ctx.master.shutdown()
        else:
            log.info("proxy listening", extra={"listeners": ", ".join(self.addresses)})

    def done(self) -> None:
        self.all_running = False
