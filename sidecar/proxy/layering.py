"""Chooses mitmproxy's protocol layers. Nothing is ever decrypted.

Explicit port: HTTP proxy; the bytes of an allowed CONNECT tunnel pass through untouched.
Transparent port: peeks at the client's first bytes: TLS (decided later on its SNI), HTTP (each
request decided on its Host) or anything else (decided on the original destination address).
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.utils import expect

from sidecar.policy.model import Destination
from sidecar.policy.store import PolicyStore
from sidecar.proxy.connections import Connections, Kind
from sidecar.proxy.hostnames import address_of

_HTTP_METHODS = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
)
# CONNECT is not among them: on the transparent port it is a conversation with some other proxy
# at the dialled address, so it is raw TCP, decided on that address by cidr rules.


def _http_prefix(data: bytes) -> bool | None:
    """True: HTTP/1 request line; False: not HTTP; None: too short to tell."""
    for method in _HTTP_METHODS:
        if data.startswith(method):
            return True
        if method.startswith(data):
            return None
    return False


type SilenceHandler = Callable[[Context], layer.Layer]


class _TransparentProxyAskingOnStart(modes.TransparentProxy):
    """mitmproxy's transparent top layer, but it does not wait forever for a client byte.

    With lazy upstream connections a server-speaks-first protocol (MySQL, SMTP) would otherwise
    wait for a client byte that never comes. Asking for the next layer on start lets an address
    the policy already allows pass through at once; for any other address, a client that stays
    silent for ``first_byte_timeout`` seconds is handed to ``on_silence`` (decided as raw TCP on
    its original address, so it is closed promptly and traced).
    """

    first_byte_timeout: float = 10.0
    on_silence: SilenceHandler | None = None

    @expect(events.Start)  # type: ignore[untyped-decorator]
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        assert self.context.server.address, "No server address set."
        self._next = layer.NextLayer(self.context, ask_on_start=True)
        self.child_layer = self._next
        self._wakeup = commands.RequestWakeup(self.first_byte_timeout)
        err = yield from self.finish_start()
        if err:
            yield commands.CloseConnection(self.context.client)
            return
        if self._next.layer is None and self.on_silence is not None:
            yield self._wakeup
        self._handle_event = self._relay

    def _relay(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self._wakeup:
            if self._next.layer is None and self.on_silence is not None:
                self._next.layer = self.on_silence(self.context)
                yield from self._next._ask()  # replays the buffered Start into that layer
            return  # our timer: never passed down (a decided layer would not expect it)
        yield from self._next.handle_event(event)


def install_transparent_start(first_byte_timeout: float, on_silence: SilenceHandler | None) -> None:
    """Make mitmproxy's transparent mode servers build the layer above."""
    _TransparentProxyAskingOnStart.first_byte_timeout = first_byte_timeout
    _TransparentProxyAskingOnStart.on_silence = on_silence
    modes.TransparentProxy = _TransparentProxyAskingOnStart  # type: ignore[misc]


class Layering:
    # Registered under the name of mitmproxy's own NextLayer addon, which this one replaces.
    name = "nextlayer"

    def __init__(self, store: PolicyStore, connections: Connections) -> None:
        self._store = store
        self._connections = connections

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        top = context.layers[0]
        if isinstance(top, modes.HttpProxy):
            if len(context.layers) == 1:
                nextlayer.layer = layers.HttpLayer(context, HTTPMode.regular)
            else:
                self._connections.get(context.client).kind = Kind.TUNNEL
                nextlayer.layer = layers.TCPLayer(context, ignore=True)
            return
        if isinstance(top, modes.TransparentProxy):
            nextlayer.layer = self._transparent(nextlayer)

    def _transparent(self, nextlayer: layer.NextLayer) -> layer.Layer | None:
        context = nextlayer.context
        info = self._connections.get(context.client)
        if info.original is None and context.server.address is not None:
            info.original = (context.server.address[0], context.server.address[1])
        data = nextlayer.data_client()
        if not data:
            if self._address_allowed(context.server.address):
                info.kind = Kind.TCP
                return layers.TCPLayer(context, ignore=True)
            return None  # wait for the client's first bytes
        if starts_like_tls_record(data):
            try:
                hello = parse_client_hello(data)
            except ValueError:
                info.kind = Kind.TCP  # not really TLS: decided by address
                return layers.TCPLayer(context, ignore=True)
            if hello is None:
                return None  # ClientHello spans more segments
            info.kind = Kind.TLS
            info.sni = hello.sni
            context.client.sni = hello.sni
            return layers.TCPLayer(context, ignore=True)
        is_http = _http_prefix(data)
        if is_http is None:
            return None
        if is_http:
            info.kind = Kind.HTTP
            return layers.HttpLayer(context, HTTPMode.transparent)
        info.kind = Kind.TCP
        return layers.TCPLayer(context, ignore=True)

    def silent_client(self, context: Context) -> layer.Layer:
        """No byte within the first-byte timeout: decided as raw TCP on the original address."""
        self._connections.get(context.client).kind = Kind.TCP
        return layers.TCPLayer(context, ignore=True)

    def _address_allowed(self, address: tuple[str, int] | None) -> bool:
        if address is None:
            return False
        ip = address_of(address[0])
        if ip is None:
            return False
        # The raw decision: in audit mode everything "permits", yet names should still be seen.
        return self._store.get().decide_raw(Destination(None, address[1], ip)).permits
