"""Chooses mitmproxy's protocol layers. Nothing is ever decrypted, except the TLS of a host a
rule inspects (``inspect: true``): TLS layers on both sides (sidecar.proxy.inspect_tls), then
HTTP/1 or HTTP/2 as the client negotiated, each request decided by the decider.

Explicit port: HTTP proxy; the bytes of an allowed CONNECT tunnel pass through untouched once
the tunnel's first flight is decided (a ClientHello must name the CONNECT host).
Transparent port: reads the client's whole first flight (``sidecar.wire.first_flight``, bounded
in time and size): TLS (decided on its SNI), HTTP (each request decided on its Host) or anything
else (decided on the original destination address).
"""

from __future__ import annotations

from typing import Protocol

from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.utils import expect

from sidecar.proxy.connections import Connections, Kind
from sidecar.proxy.decider import Decider
from sidecar.wire.first_flight import FirstFlight, Flight, classify, classify_tls, looks_like_tls


class FirstFlightControl(Protocol):
    def hold(self, context: Context) -> bool:
        """Open the upstream before the client's first flight?"""

    def undecided(self, context: Context, data: bytes) -> layer.Layer:
        """The first-flight time bound passed (or the held upstream closed) with ``data`` in."""


class Refuse(layer.Layer):
    """Closes the client and any upstream: nothing the client sent is relayed."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.context.server.connected:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


class _TransparentFirstFlight(modes.TransparentProxy):
    """mitmproxy's transparent top layer, reading the client's first flight within a bound.

    With lazy upstream connections a server-speaks-first protocol (MySQL, SMTP) would wait for a
    client byte that never comes: to an address ``control.hold`` allows, the upstream is opened
    at once and its bytes reach the client, while the client's bytes are held until the next
    layer is chosen. A first flight still undecided after ``first_flight_timeout`` seconds (a
    silent client, or one that stopped mid-ClientHello) is handed to ``control.undecided``.
    """

    first_flight_timeout: float = 10.0
    control: FirstFlightControl | None = None

    @expect(events.Start)  # type: ignore[untyped-decorator]
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        assert self.context.server.address, "No server address set."
        self._next = layer.NextLayer(self.context)
        self.child_layer = self._next
        self._wakeup = commands.RequestWakeup(self.first_flight_timeout)
        err = yield from self.finish_start()
        if err:
            yield commands.CloseConnection(self.context.client)
            return
        self._handle_event = self._relay
        self._held = self.control is not None and self.control.hold(self.context)
        if self._held:
            err = yield commands.OpenConnection(self.context.server)
            if err:
                yield commands.CloseConnection(self.context.client)
                self._handle_event = self.done
                return
        if self._next.layer is None and self.control is not None:
            yield self._wakeup

    def _decide_now(self) -> layer.CommandGenerator[None]:
        assert self.control is not None
        self._next.layer = self.control.undecided(self.context, self._next.data_client())
        yield from self._next._ask()  # replays the buffered events into that layer

    def _relay(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self._wakeup:
            if self._next.layer is None and self.control is not None:
                yield from self._decide_now()
            return  # our timer: never passed down (a decided layer would not expect it)
        held_server = (
            self._next.layer is None
            and isinstance(event, events.ConnectionEvent)
            and event.connection == self.context.server
        )
        if held_server and isinstance(event, events.DataReceived):
            # The server speaks first: its bytes reach the client; the client's stay held.
            yield commands.SendData(self.context.client, event.data)
            return
        if held_server and isinstance(event, events.ConnectionClosed) and self.control:
            yield from self._decide_now()  # the server hung up before the client spoke
        yield from self._next.handle_event(event)
        if self._held and isinstance(self._next.layer, layers.HttpLayer):
            self._held = False
            if self.context.server.connected:
                # Each request opens its own upstream, to the vetted address of its Host: the
                # early connection would only sit idle.
                yield commands.CloseConnection(self.context.server)


def install_transparent_start(first_flight_timeout: float, control: FirstFlightControl) -> None:
    """Make mitmproxy's transparent mode servers build the layer above."""
    _TransparentFirstFlight.first_flight_timeout = first_flight_timeout
    _TransparentFirstFlight.control = control
    modes.TransparentProxy = _TransparentFirstFlight  # type: ignore[misc]


def _inspected_tls(context: Context) -> layer.Layer:
    """TLS terminated on both sides, as mitmproxy stacks it: the server's layer above the
    client's, so that the upstream's handshake can finish before the client's is answered."""
    server_tls = layers.ServerTLSLayer(context)
    server_tls.child_layer = layers.ClientTLSLayer(context)
    return server_tls


class Layering:
    # Registered under the name of mitmproxy's own NextLayer addon, which this one replaces.
    name = "nextlayer"

    def __init__(self, connections: Connections, decider: Decider) -> None:
        self._connections = connections
        self._decider = decider

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        if any(isinstance(each, layers.ClientTLSLayer) for each in context.layers):
            # Inside inspected TLS: the requests, HTTP/1 or HTTP/2 (the negotiated ALPN).
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)
            return
        top = context.layers[0]
        if isinstance(top, modes.HttpProxy):
            if len(context.layers) == 1:
                nextlayer.layer = layers.HttpLayer(context, HTTPMode.regular)
            else:
                nextlayer.layer = self._tunnel(nextlayer)
            return
        if isinstance(top, modes.TransparentProxy):
            nextlayer.layer = self._transparent(nextlayer)

    def _tunnel(self, nextlayer: layer.NextLayer) -> layer.Layer | None:
        """Inside an allowed CONNECT: peek at (never decrypt) the client's first flight."""
        context = nextlayer.context
        self._connections.get(context.client).kind = Kind.TUNNEL
        data = nextlayer.data_client()
        flight = classify_tls(data)
        if flight is None and (data or not nextlayer.data_server()):
            return None  # wait for the rest (bounded by the classifier's size limit)
        # flight None here: the server spoke first, no ClientHello is coming (CONNECT decided).
        if not self._decider.settle_tunnel(context.client, flight):
            return Refuse(context)
        if self._decider.inspecting(context.client):
            return _inspected_tls(context)  # settle_tunnel refused anything but TLS
        return layers.TCPLayer(context, ignore=True)

    def _transparent(self, nextlayer: layer.NextLayer) -> layer.Layer | None:
        context = nextlayer.context
        flight = classify(nextlayer.data_client())
        if flight is None:
            return None  # wait for more (bounded in size by the classifier, in time above)
        return self._decided(context, flight)

    def _decided(self, context: Context, flight: FirstFlight) -> layer.Layer:
        info = self._connections.get(context.client)
        if flight.kind is Flight.UNREADABLE:
            info.kind = Kind.TLS if flight.tls else Kind.TCP
            self._decider.refuse_unreadable(context.client, info.kind, flight.problem)
            return Refuse(context)
        if flight.kind is Flight.HTTP:
            info.kind = Kind.HTTP
            return layers.HttpLayer(context, HTTPMode.transparent)
        info.kind = Kind.TLS if flight.kind is Flight.TLS else Kind.TCP
        info.sni = context.client.sni = flight.sni
        if info.held:
            # Its address a cidr rule allows: that rule decides it, whole, never inspected.
            if not self._decider.decide_held(context.client, info.kind, info.sni):
                return Refuse(context)
        elif flight.sni is not None and self._decider.inspect_transparent(
            context.client, flight.sni
        ):
            return _inspected_tls(context)
        return layers.TCPLayer(context, ignore=True)

    # -- FirstFlightControl ------------------------------------------------------------------

    def hold(self, context: Context) -> bool:
        address = context.server.address
        assert address is not None
        return self._decider.hold_upstream(context.client, (address[0], address[1]))

    def undecided(self, context: Context, data: bytes) -> layer.Layer:
        """Nothing decidable within the bound. Silence: raw TCP on the original address (a
        server-speaks-first protocol). A partial first flight: refused, since what it would
        reveal (an SNI, a Host) was never decided; relaying it by address would let a client
        that dribbles its ClientHello past the bound skip the name deny rules."""
        if data:
            problem = f"the first flight stopped after {len(data)} bytes"
            tls = looks_like_tls(data)  # what the classifier reads as TLS, recorded as TLS
            return self._decided(context, FirstFlight(Flight.UNREADABLE, problem=problem, tls=tls))
        return self._decided(context, FirstFlight(Flight.OTHER))
