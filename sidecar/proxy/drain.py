"""Graceful stop: stop accepting, let in-flight requests and tunnels finish, then cut the rest.

Kubernetes sends SIGTERM and, ``terminationGracePeriodSeconds`` (30 s by default) later, SIGKILL.
On SIGTERM the proxy listeners close at once (new connections are refused; readiness reports
503 while liveness stays 200), connections with nothing in flight are closed, and the others —
a plain-HTTP exchange under way, a CONNECT tunnel, a transparent TLS or TCP stream — get up to
the drain timeout to finish. What is still open then is cut: an HTTP exchange's span ends with an
error saying the sidecar shut down (a tunnel's span ended when it connected), so that every span
is ended before the tracer provider is flushed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import connection, ctx, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.flow import Error
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler

from sidecar.proxy.connections import Connections, Kind

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
CUT_WAIT_SECONDS = 2.0  # for cut connections to run their disconnect hooks
# Connections of these kinds relay a stream for as long as it lasts: in flight while open.
_STREAMS = frozenset({Kind.TUNNEL, Kind.TLS, Kind.TCP})


class Drain:
    """A mitmproxy addon that knows which client connections have something in flight.

    Added before the decision addon: a request is in flight from the moment its head has
    arrived, also while its decision waits on a name lookup or its CONNECT on the upstream
    connect (hooks run addon by addon, so an addon after the decider would see it only then).
    """

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._clients: dict[str, connection.Client] = {}
        self._flows: dict[str, set[http.HTTPFlow]] = {}  # open HTTP exchanges by client id
        self._tunnels: set[str] = set()  # clients whose CONNECT was allowed: a tunnel is open
        self.draining = False

    # -- hooks ----------------------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        if self.draining:
            # Accepted just before the listeners closed: nothing was sent on it yet.
            client.error = "egress-sidecar is shutting down"
            return
        self._clients[client.id] = client

    def client_disconnected(self, client: connection.Client) -> None:
        self._clients.pop(client.id, None)
        self._flows.pop(client.id, None)
        self._tunnels.discard(client.id)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Being decided, then connected upstream: in flight until answered either way.
        self._flows.setdefault(flow.client_conn.id, set()).add(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._tunnels.add(flow.client_conn.id)  # the tunnel opens: busy while it lasts
        self._done(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)  # refused (403) or unreachable (502/504): the answer ends it

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._flows.setdefault(flow.client_conn.id, set()).add(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining and flow.response is not None:
            # The client is told not to send another request on this connection.
            flow.response.headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        flows = self._flows.get(flow.client_conn.id)
        if flows is not None:
            flows.discard(flow)

    # -- the drain ------------------------------------------------------------------------------

    def _busy(self, client_id: str) -> bool:
        if self._flows.get(client_id):
            return True
        client = self._clients.get(client_id)
        if client is None:
            return client_id in self._tunnels
        info = self._connections.get(client)
        if info.inspect_host is not None:
            # Inspected TLS carries requests, each tracked in _flows: between them the
            # connection is an idle keep-alive, closed like any other.
            return False
        return client_id in self._tunnels or info.kind in _STREAMS

    # The front door (sidecar.fastpath.server) runs the drain over both tiers: these are the
    # steps for the connections mitmproxy holds.

    def _proxyserver(self) -> Proxyserver:
        proxyserver = ctx.master.addons.get("proxyserver")
        assert isinstance(proxyserver, Proxyserver)
        return proxyserver

    def begin(self) -> int:
        """Refuse what is accepted from now on; how many connections have something in flight."""
        self.draining = True
        return sum(1 for cid in list(self._clients) if self._busy(cid))

    def close_idle(self) -> None:
        for cid, handler in list(self._proxyserver().connections.items()):
            if isinstance(cid, str) and not self._busy(cid):
                _cut(handler)  # idle keep-alive (or not yet decided): nothing is lost

    def busy(self) -> int:
        return sum(1 for cid in self._clients if self._busy(cid))

    async def cut_all(self) -> None:
        await self._cut_all(self._proxyserver())

    async def _cut_all(self, proxyserver: Proxyserver) -> None:
        for flows in list(self._flows.values()):
            for flow in list(flows):
                # The decision addon ends the span on this hook, with this message.
                flow.error = Error("egress-sidecar shut down before the transfer completed")
                await ctx.master.addons.handle_lifecycle(HttpErrorHook(flow))
        for handler in list(proxyserver.connections.values()):
            _cut(handler)
        deadline = time.monotonic() + CUT_WAIT_SECONDS
        while proxyserver.connections and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS / 5)


def _cut(handler: ProxyConnectionHandler) -> None:
    io = handler.transports.get(handler.client)
    if io is None:
        return
    if io.handler is not None:
        io.handler.cancel("egress-sidecar shutting down")
    elif io.writer is not None:
        io.writer.close()
