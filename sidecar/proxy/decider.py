"""The decision addon: every outbound call gets exactly one decision before any byte leaves.

- explicit plain HTTP: ``requestheaders`` (each request; answered 403 when denied)
- explicit CONNECT: ``http_connect`` (answered 403 when denied; else the tunnel is pinned to
  the vetted address, answered only once that upstream is up, 502/504 when it cannot be reached)
  and, for good, on the tunnel's first flight: a ClientHello naming another host is refused
  (``settle_tunnel``); the bytes pass through untouched, never decrypted
- transparent HTTP: ``requestheaders`` on the Host header, sent to a vetted address of that host
- transparent TLS / TCP: ``server_connect`` on the SNI or the original destination; a denied
  connection gets ``server.error`` set, so nothing is ever sent upstream. To an address a cidr
  rule allows, the upstream is opened at once (a server may speak first) but the client's bytes
  are held until its first flight is decided (``decide_held``): a denied SNI is refused there
- anything else that tries to connect upstream without a vetted address is refused
  (fail closed), which is why upstream connections must be lazy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from mitmproxy import connection, http, tls
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http._events import ErrorCode, ResponseProtocolError
from mitmproxy.proxy.mode_specs import TransparentMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from sidecar.fastpath.refusal import refused_head_record
from sidecar.fastpath.vetting import (
    HTTPS_TARGET,
    Vetted,
    address_allows,
    address_vetted,
    held_vetted,
    same_host,
    stream_decision,
    tunnel_denial,
    vet,
    without_ca,
)
from sidecar.inspection import InspectionCA
from sidecar.policy.errors import InvalidHost
from sidecar.policy.hosts import normalize_host
from sidecar.policy.model import Decision, Destination, Reason, Verdict
from sidecar.policy.store import PolicyStore, Snapshot
from sidecar.policy.target import InvalidTarget, parse_authority
from sidecar.proxy.connections import ConnectionInfo, Connections, Kind, Pending
from sidecar.proxy.denial import denial_response, failure_response, failure_status
from sidecar.proxy.headlimits import HeadRejection
from sidecar.proxy.hostnames import address_of, format_hostport, redact_url
from sidecar.proxy.resolver import Resolver
from sidecar.proxy.tunnels import CONNECT_RECORD, upstream_failure
from sidecar.record import Capture, DecisionRecord
from sidecar.reporter import OpenDecision, Reporter
from sidecar.telemetry.spans import (
    TLS_CLIENT_REJECTED,
    error_type,
    extract_parent,
    inject_context,
)
from sidecar.wire.first_flight import FirstFlight, Flight

log = logging.getLogger(__name__)

_METADATA_KEY = "egress"


def _capture(client: connection.Client) -> Capture:
    if isinstance(client.proxy_mode, TransparentMode):
        return Capture.TRANSPARENT
    return Capture.EXPLICIT


def _peer(client: connection.Client) -> str | None:
    return client.peername[0] if client.peername else None


def _authority_host(authority: str | None) -> str | None:
    try:  # the parser `check` uses too: one reading of an authority
        return parse_authority(authority or "").host
    except InvalidTarget:
        return None


CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_DISCONNECTED = "upstream_disconnected"


def _failure_type(flow: http.HTTPFlow, message: str) -> str:
    """Which side ended an allowed plain-HTTP exchange, as a span's error.type.

    mitmproxy's messages do not say it ("Client disconnected." is also what its upstream side
    reports); the connections' states do: a peer whose read side closed ended it.
    """
    if flow.server_conn.timestamp_tcp_setup is None:
        # Never connected upstream: the connect's own failure (refused, timeout, ...), unless the
        # client left first.
        category = error_type(message)
        if category != "upstream_error" or flow.client_conn.state & ConnectionState.CAN_READ:
            return category
        return CLIENT_DISCONNECTED
    if not flow.client_conn.state & ConnectionState.CAN_READ:
        return CLIENT_DISCONNECTED
    if not flow.server_conn.state & ConnectionState.CAN_READ:
        return UPSTREAM_DISCONNECTED
    return error_type(message)


# Hop-by-hop fields end at this proxy (RFC 9110 7.6.1); the upstream never sees them. Framing
# (Transfer-Encoding) and protocol upgrades (Upgrade) are mitmproxy's to relay.
_HOP_BY_HOP = ("proxy-connection", "keep-alive")
_KEPT_CONNECTION_OPTIONS = frozenset(
    {"close", "keep-alive", "upgrade", "transfer-encoding", "host"}
)


def _drop_hop_by_hop(request: http.Request, capture: Capture) -> None:
    listed = {
        token.strip().lower()
        for value in request.headers.get_all("connection")
        for token in value.split(",")
    }
    for name in listed - _KEPT_CONNECTION_OPTIONS:
        if name:
            request.headers.pop(name, None)
    for name in _HOP_BY_HOP:
        request.headers.pop(name, None)
    if capture is Capture.EXPLICIT:
        # Credentials for this proxy, not for the destination.
        request.headers.pop("proxy-authorization", None)


def _align_host_header(request: http.Request, host: str, port: int) -> None:
    """Make the Host header name the host that was decided.

    Otherwise a server hosting several sites on an allowed address would route by a Host (or
    request-target) the policy never saw. RFC 9112 3.2.2: a proxy replaces a Host that
    disagrees with the request-target. Agreeing headers are left byte for byte.
    """
    if same_host(_authority_host(request.host_header), host):
        return
    try:
        ascii_host = normalize_host(host)
    except InvalidHost:
        ascii_host = host
    default = 443 if request.scheme == "https" else 80
    request.host_header = format_hostport(ascii_host, port, default)


class Decider:
    def __init__(
        self,
        store: PolicyStore,
        reporter: Reporter,
        resolver: Resolver,
        connections: Connections,
        connect_timeout: float = 10.0,
        *,
        inspection: InspectionCA | None = None,
    ) -> None:
        self._store = store
        self._inspection = inspection
        self._reporter = reporter
        self._resolver = resolver
        self._connections = connections
        self._connect_timeout = connect_timeout
        # Upstream connects in progress, by server connection id: mitmproxy has no connect
        # timeout of its own (the kernel would retry SYNs for ~2 minutes).
        self._connect_timers: dict[str, asyncio.TimerHandle] = {}
        # Prepared failure answers (502/504) by client connection, taken by error_answer; weak,
        # so an answer mitmproxy never asks for goes with its connection.
        self._answers: weakref.WeakKeyDictionary[connection.Client, bytes] = (
            weakref.WeakKeyDictionary()
        )

    # -- deciding -------------------------------------------------------------------------------

    async def vet(self, snap: Snapshot, dest: Destination, *, stream: bool = False) -> Vetted:
        """Decide ``dest`` and find the address to connect to (the one that was checked);
        ``stream``: a transparent raw stream, which addresses learned from DNS may allow."""
        learned = self._resolver.learned if stream else None
        return await vet(self._resolver, snap, dest, learned=learned)

    def _record(
        self,
        snap: Snapshot,
        vetted: Vetted,
        *,
        capture: Capture,
        protocol: str,
        host: str | None,
        port: int,
        client: connection.Client,
    ) -> DecisionRecord:
        return DecisionRecord(
            decision=vetted.decision,
            capture=capture,
            protocol=protocol,
            host=host,
            port=port,
            policy_source=snap.source,
            policy_version=snap.version,
            mode=snap.mode.value,
            peer_address=vetted.peer,
            client_address=_peer(client),
        )

    # -- explicit CONNECT ---------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        start_ns = time.time_ns()
        snap = self._store.get()
        host, port = flow.request.host, flow.request.port
        inspecting = snap.inspection(host, port)
        vetted = await self.vet(snap, Destination(host, port, inspected=inspecting is not None))
        if inspecting is not None and not self.inspection_available:
            vetted = without_ca(vetted, inspecting, self._inspection_problem, snap.mode)
        rec = self._record(
            snap,
            vetted,
            capture=_capture(flow.client_conn),
            protocol="CONNECT",
            host=host,
            port=port,
            client=flow.client_conn,
        )
        rec.method = "CONNECT"
        if not vetted.decision.permits or vetted.address is None:
            rec.status_code = 403
            flow.response = denial_response(rec)
            self._reporter.report(rec, start_ns=start_ns)
            return
        if inspecting is not None and self.inspection_available:
            # Its TLS is terminated here (sidecar.proxy.layering, inspect_tls); each request
            # inside is decided by inspected_request.
            self._inspect(flow.client_conn, inspecting, host)
            rec.tls_inspected = True
        else:
            rec.tls_passthrough = True
        # Pins the tunnel to the vetted address: mitmproxy connects to request.host, before it
        # answers (sidecar.proxy.tunnels); the outcome and the first flight complete the record.
        flow.request.data.host = str(vetted.address)
        flow.metadata[CONNECT_RECORD] = rec
        self._await_upstream(flow.client_conn, rec, (str(vetted.address), port), start_ns)

    def settle_tunnel(self, client: connection.Client, flight: FirstFlight | None) -> bool:
        """Decide an allowed tunnel for good on its first flight (None: the server spoke first;
        sidecar.fastpath.vetting.tunnel_denial says how)."""
        info = self._connections.get(client)
        pending = info.tunnel
        if pending is None:
            return True
        info.tunnel = None
        rec = pending.record
        denial = tunnel_denial(rec, flight)
        inspected = info.inspect_host is not None
        if denial is None and inspected and (flight is None or flight.kind is not Flight.TLS):
            # Whatever the mode: what is not TLS cannot be inspected, and would pass undecided.
            denial = Decision(
                Verdict.DENY,
                Reason.L7_NOT_VISIBLE,
                rec.decision.rule,
                f"the tunnel to {rec.host}, an inspected host, does not carry TLS",
            )
        if denial is not None:
            rec.decision = denial
        if inspected and rec.decision.permits:
            info.inspect_channel = pending  # reported with the client's TLS handshake
            return True
        self._reporter.report(rec, start_ns=pending.start_ns)
        return rec.decision.permits

    # -- HTTPS inspection (inspect: true) -------------------------------------------------------

    @property
    def inspection_available(self) -> bool:
        return self._inspection is not None and self._inspection.available

    @property
    def _inspection_problem(self) -> str | None:
        if self._inspection is None:
            return "no inspection CA configured"
        return self._inspection.problem

    def _inspect(self, client: connection.Client, rule: str, host: str) -> None:
        info = self._connections.get(client)
        info.inspect_rule = rule
        try:
            info.inspect_host = normalize_host(host)
        except InvalidHost:
            info.inspect_host = host

    def inspect_transparent(self, client: connection.Client, sni: str) -> bool:
        """A transparent ClientHello: True when its SNI is inspected (TLS layers follow). The
        inspecting rule is kept either way: without the CA the stream is denied when it is
        decided (server_connect)."""
        info = self._connections.get(client)
        port = info.original[1] if info.original is not None else 443
        rule = self._store.get().inspection(sni, port)
        info.inspect_rule = rule
        if rule is None or not self.inspection_available:
            return False
        self._inspect(client, rule, sni)
        return True

    def inspecting(self, client: connection.Client) -> bool:
        return self._connections.get(client).inspect_host is not None

    async def inspected_request(self, flow: http.HTTPFlow, host: str) -> None:
        """One HTTPS request inside inspected TLS: decided by its method and path (the same 403
        within the TLS when denied: the upstream receives nothing), on the connection the
        channel already opened to the vetted address."""
        request = flow.request
        snap = self._store.get()
        info = self._connections.get(flow.client_conn)
        server = flow.server_conn.address or (request.host, request.port)
        address, port = address_of(server[0]), server[1]
        method = request.method.upper()
        path = request.path.split("?", 1)[0] or "/"
        decision = snap.decide(Destination(host, port, address, method, path))
        rec = self._record(
            snap,
            Vetted(decision, address),
            capture=_capture(flow.client_conn),
            protocol=method,
            host=host,
            port=port,
            client=flow.client_conn,
        )
        rec.method = method
        rec.tls_inspected = True
        rec.url = redact_url(f"https://{format_hostport(host, port, 443)}{request.path}")
        start_ns = int(request.timestamp_start * 1e9)
        opened = self._reporter.begin(
            rec, parent=extract_parent(request.headers), start_ns=start_ns
        )
        if not decision.permits:
            rec.status_code = 403
            flow.response = denial_response(rec)
            self._reporter.end(opened)
            return
        if info.upstream_tls_error is not None:
            # The upstream's certificate failed verification when the channel opened: answered
            # here, nothing is sent.
            rec.error = info.upstream_tls_error
            rec.error_type = error_type(rec.error)
            rec.status_code = 502
            flow.response = failure_response(rec, 502)
            self._reporter.end(opened)
            return
        _align_host_header(request, host, port)
        carrier: dict[str, str] = {}
        inject_context(opened.span, carrier)
        for key, value in carrier.items():
            request.headers[key] = value
        _drop_hop_by_hop(request, rec.capture)
        request.stream = True
        flow.metadata[_METADATA_KEY] = opened

    def tls_failed_server(self, data: tls.TlsData) -> None:
        info = self._connections.get(data.context.client)
        if info.inspect_host is not None:
            info.upstream_tls_error = data.conn.error or "upstream TLS handshake failed"

    def tls_established_client(self, data: tls.TlsData) -> None:
        info = self._connections.get(data.context.client)
        pending, info.inspect_channel = info.inspect_channel, None
        if pending is None:
            return
        if info.upstream_tls_error is not None:
            pending.record.error = info.upstream_tls_error
        self._reporter.report(pending.record, start_ns=pending.start_ns)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        info = self._connections.get(data.context.client)
        pending, info.inspect_channel = info.inspect_channel, None
        if pending is None:
            return
        # The app refused the leaf certificate (it does not trust the CA, or pins): the span
        # says so, the only place the app's owner can see why its call failed.
        rec = pending.record
        rec.error = f"the client refused the inspection certificate: {data.conn.error or '-'}"
        rec.error_type = TLS_CLIENT_REJECTED
        self._reporter.report(rec, start_ns=pending.start_ns)

    # -- plain HTTP (explicit and transparent) --------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        inspected = self._connections.get(flow.client_conn).inspect_host
        if inspected is not None:
            await self.inspected_request(flow, inspected)
            return
        request = flow.request
        capture = _capture(flow.client_conn)
        snap = self._store.get()
        if capture is Capture.TRANSPARENT:
            original = flow.server_conn.address
            assert original is not None
            port = original[1]
            # An absolute-form request-target wins over Host (RFC 9112 3.2.2: the server uses
            # it), so that is what is decided; Host is then made to agree with it.
            host = _authority_host(request.authority) or _authority_host(request.host_header)
            dest_host = host
            original_address = original[0]
        else:
            host = dest_host = request.host
            port = request.port
            original_address = None
        path = request.path.split("?", 1)[0] or "/"
        dest = Destination(
            dest_host,
            port,
            address_of(original_address) if dest_host is None and original_address else None,
            request.method.upper(),
            path,
        )
        if request.scheme == "https":
            vetted = HTTPS_TARGET
        else:
            vetted = await self.vet(snap, dest)
        rec = self._record(
            snap,
            vetted,
            capture=capture,
            protocol=request.method.upper(),
            host=host,
            port=port,
            client=flow.client_conn,
        )
        rec.method = request.method.upper()
        rec.original_address = original_address
        url_host = host or original_address or request.host
        rec.url = redact_url(
            f"{request.scheme}://{url_host if ':' not in url_host else f'[{url_host}]'}"
            f":{port}{request.path}"
        )
        start_ns = int(request.timestamp_start * 1e9)
        opened = self._reporter.begin(
            rec, parent=extract_parent(request.headers), start_ns=start_ns
        )
        if not vetted.decision.permits or vetted.address is None:
            rec.status_code = 403
            flow.response = denial_response(rec)
            self._reporter.end(opened)
            return
        if host is not None:
            _align_host_header(request, host, port)
        request.data.host = str(vetted.address)  # connect to the address that was checked
        request.data.port = port
        self._connections.get(flow.client_conn).vetted.add((str(vetted.address), port))
        # The upstream sees a traceparent naming our span (the incoming one is its parent).
        carrier: dict[str, str] = {}
        inject_context(opened.span, carrier)
        for key, value in carrier.items():
            request.headers[key] = value
        _drop_hop_by_hop(request, capture)
        request.stream = True  # never buffer bodies: nothing in them is decided
        flow.metadata[_METADATA_KEY] = opened

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and _METADATA_KEY in flow.metadata:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        opened: OpenDecision | None = flow.metadata.pop(_METADATA_KEY, None)
        if opened is not None and flow.response is not None:
            opened.record.status_code = flow.response.status_code
            self._reporter.end(opened)

    def error(self, flow: http.HTTPFlow) -> None:
        opened: OpenDecision | None = flow.metadata.pop(_METADATA_KEY, None)
        if opened is None:
            return
        rec = opened.record
        rec.error = flow.error.msg if flow.error else "upstream error"
        rec.error_type = _failure_type(flow, rec.error)
        if flow.response is not None:
            rec.status_code = flow.response.status_code  # its head already went to the client
        elif (
            rec.error_type != CLIENT_DISCONNECTED
            and flow.client_conn.state & ConnectionState.CAN_WRITE
        ):
            # Nothing was answered yet: the client gets our 502/504, and the span says which.
            rec.status_code = failure_status(rec.error_type)
            self._answers[flow.client_conn] = bytes(
                http1.assemble_response(failure_response(rec, rec.status_code))
            )
        self._reporter.end(opened)

    # -- what the client's HTTP/1 connection answers itself (sidecar.proxy.http1) -----------

    def error_answer(self, context: Context, event: ResponseProtocolError) -> bytes | None:
        """Our answer where mitmproxy would send its error page: the one ``error`` prepared for
        this client's failed request, or for a request mitmproxy cannot route (origin-form
        without a usable Host on the explicit port, refused before any hook) a denial."""
        prepared = self._answers.pop(context.client, None)
        if prepared is not None or event.code is not ErrorCode.DESTINATION_UNKNOWN:
            return prepared
        return self.head_rejected(
            context, HeadRejection(400, Reason.INVALID_DESTINATION, event.message), b""
        )

    def head_rejected(self, context: Context, rejection: HeadRejection, head: bytes) -> bytes:
        """A request head refused before parsing (limits, timeout, invalid framing): its decision
        (deny, whatever the mode: such a head is never passed on) and the answer to send."""
        snap = self._store.get()
        client = context.client
        capture = _capture(client)
        original: tuple[str, int] | None = None
        if capture is Capture.TRANSPARENT and context.server.address is not None:
            original = (context.server.address[0], context.server.address[1])
        rec = refused_head_record(
            snap, capture, rejection, head, original=original, client_address=_peer(client)
        )
        self._reporter.report(rec)
        return bytes(http1.assemble_response(denial_response(rec, rejection.status)))

    # -- transparent TLS and TCP, and the fail-closed check for every upstream connection -------

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        server, client = data.server, data.client
        if server.address is None:
            server.error = "egress-sidecar: no destination"
            return
        info = self._connections.get(client)
        if (server.address[0], server.address[1]) in info.vetted:
            self._arm_connect_timer(data)
            return
        if _capture(client) is Capture.TRANSPARENT and info.kind in (Kind.TLS, Kind.TCP):
            await self._decide_transparent_stream(data, info.kind, info.sni)
            if server.error is None:
                self._arm_connect_timer(data)
            return
        log.warning(
            "refused an upstream connection that no decision vetted",
            extra={"address": f"{server.address[0]}:{server.address[1]}", "kind": info.kind},
        )
        server.error = "egress-sidecar: destination was not vetted"

    async def _decide_transparent_stream(
        self, data: ServerConnectionHookData, kind: Kind, sni: str | None
    ) -> None:
        start_ns = time.time_ns()
        server, client = data.server, data.client
        assert server.address is not None
        original_ip, port = server.address[0], server.address[1]
        snap = self._store.get()
        by_sni = kind is Kind.TLS and sni is not None
        original = address_of(original_ip)
        info = self._connections.get(client)
        inspecting = info.inspect_rule if by_sni else None
        inspected = inspecting is not None
        if by_sni and address_allows(snap, original, port):
            decision = stream_decision(snap, sni, original, port, inspected=inspected)
            vetted = Vetted(decision, original)
        elif by_sni:
            vetted = await self.vet(snap, Destination(sni, port, inspected=inspected))
        else:
            vetted = await self.vet(snap, Destination(None, port, original), stream=True)
        if inspecting is not None and info.inspect_host is None:
            vetted = without_ca(vetted, inspecting, self._inspection_problem, snap.mode)
        rec = self._stream_record(
            snap, vetted, client, kind=kind, sni=sni, original_ip=original_ip, port=port
        )
        if info.inspect_host is not None:
            rec.tls_passthrough, rec.tls_inspected = False, True
        if not vetted.decision.permits or vetted.address is None:
            server.error = (
                f"egress-sidecar denied {rec.protocol} to {sni or original_ip}:{port}: "
                f"{vetted.decision.reason.value}"
            )
            if rec.peer_address is None:
                rec.peer_address = original_ip
        else:
            server.address = (str(vetted.address), port)
            self._await_upstream(client, rec, server.address, start_ns)
            return
        self._reporter.report(rec, start_ns=start_ns)

    def _stream_record(
        self,
        snap: Snapshot,
        vetted: Vetted,
        client: connection.Client,
        *,
        kind: Kind,
        sni: str | None,
        original_ip: str,
        port: int,
    ) -> DecisionRecord:
        rec = self._record(
            snap,
            vetted,
            capture=Capture.TRANSPARENT,
            protocol="TLS" if kind is Kind.TLS else "TCP",
            host=(sni if kind is Kind.TLS else None) or vetted.host,
            port=port,
            client=client,
        )
        rec.original_address = original_ip
        rec.tls_passthrough = kind is Kind.TLS
        return rec

    # -- transparent: held upstreams (cidr-allowed addresses) and unreadable first flights -----

    def hold_upstream(self, client: connection.Client, original: tuple[str, int]) -> bool:
        """Whether to open the upstream before the client's first flight: only to an address a
        cidr rule allows (a server-speaks-first protocol then works); the client's bytes are
        held until ``decide_held`` decides them."""
        info = self._connections.get(client)
        info.original = original
        snap, learned = self._store.get(), self._resolver.learned
        if not address_allows(snap, address_of(original[0]), original[1], learned):
            return False
        info.held = True
        info.vetted.add(original)
        return True

    def decide_held(self, client: connection.Client, kind: Kind, sni: str | None) -> bool:
        """Decide a held connection on what its first flight revealed (or on its address, when
        it revealed nothing); report it; True when the held upstream may now be relayed."""
        info = self._connections.get(client)
        assert info.original is not None
        original_ip, port = info.original
        snap = self._store.get()
        original = address_of(original_ip)
        by_sni = sni if kind is Kind.TLS else None
        vetted = held_vetted(snap, by_sni, original, port, self._resolver.learned)
        decision = vetted.decision
        rec = self._stream_record(
            snap,
            vetted,
            client,
            kind=kind,
            sni=by_sni,
            original_ip=original_ip,
            port=port,
        )
        rec.error = info.held_error
        self._reporter.report(rec)
        return decision.permits

    def refuse_unreadable(self, client: connection.Client, kind: Kind, problem: str | None) -> None:
        """A first flight that looks like TLS but yields no readable ClientHello within the
        bounds (time, size): refused, whatever the address (a server might read a name from it
        that was never decided)."""
        info = self._connections.get(client)
        assert info.original is not None
        original_ip, port = info.original
        snap = self._store.get()
        # Refused whatever the mode (see settle_tunnel): the record says deny, as it is.
        decision = Decision(Verdict.DENY, Reason.UNREADABLE_FIRST_FLIGHT, detail=problem)
        rec = self._stream_record(
            snap,
            Vetted(decision, None),
            client,
            kind=kind,
            sni=None,
            original_ip=original_ip,
            port=port,
        )
        rec.peer_address = original_ip
        self._reporter.report(rec)

    # -- the outcome of an allowed stream's upstream connection ----------------------------------

    def _await_upstream(
        self,
        client: connection.Client,
        rec: DecisionRecord,
        address: tuple[str, int],
        start_ns: int,
    ) -> None:
        """Vet ``address`` for this client; the decision is reported with the connect's outcome."""
        info = self._connections.get(client)
        info.vetted.add(address)
        info.awaiting[address] = Pending(rec, start_ns)

    def _arm_connect_timer(self, data: ServerConnectionHookData) -> None:
        # server_connect runs inside the task that connects: cancelling it with a message makes
        # mitmproxy fail the connect with that message (server.error, server_connect_error).
        task = asyncio.current_task()
        if task is None or self._connect_timeout <= 0:
            return
        message = f"connect timed out after {self._connect_timeout:g} s"
        server_id = data.server.id

        def expire() -> None:
            # Popped here too: a connect that ends with neither hook (its task cancelled when
            # the client left) must not leave its timer behind.
            self._connect_timers.pop(server_id, None)
            task.cancel(message)

        self._connect_timers[server_id] = asyncio.get_running_loop().call_later(
            self._connect_timeout, expire
        )

    def _disarm_connect_timer(self, data: ServerConnectionHookData) -> None:
        timer = self._connect_timers.pop(data.server.id, None)
        if timer is not None:
            timer.cancel()

    def server_connected(self, data: ServerConnectionHookData) -> None:
        self._disarm_connect_timer(data)
        if data.server.address is None:
            return
        info = self._connections.get(data.client)
        pending = info.awaiting.pop((data.server.address[0], data.server.address[1]), None)
        if pending is None:
            return
        if pending.record.protocol == "CONNECT":
            pending.record.status_code = 200
            info.tunnel = pending  # decided for good on the tunnel's first flight
        elif pending.record.tls_inspected:
            info.inspect_channel = pending  # reported with the client's TLS handshake
        else:
            self._reporter.report(pending.record, start_ns=pending.start_ns)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._disarm_connect_timer(data)
        if data.server.address is None:
            return
        info = self._connections.get(data.client)
        error = data.server.error or "connect failed"
        if info.held and info.kind is Kind.PENDING:
            info.held_error = error  # reported with the connection's decision
        pending = info.awaiting.pop((data.server.address[0], data.server.address[1]), None)
        if pending is not None:
            # Allowed, but the destination could not be reached: the span says so.
            pending.record.error = error
            if pending.record.protocol == "CONNECT":
                pending.record.status_code = upstream_failure(error)[0]
            self._reporter.report(pending.record, start_ns=pending.start_ns)

    def client_disconnected(self, client: connection.Client) -> None:
        info = self._connections.get(client)
        left = [info.tunnel, info.inspect_channel]
        for pending in [*info.awaiting.values(), *(p for p in left if p is not None)]:
            # The client left before the stream or tunnel started: decided as it stood.
            self._reporter.report(pending.record, start_ns=pending.start_ns)
        if info.kind is Kind.PENDING and info.original is not None:
            # A transparent connection that never sent a byte (e.g. a server-speaks-first
            # protocol to an address no cidr rule allows) was held, never connected upstream.
            # It still gets its decision: by the original address, as raw TCP.
            self._report_unsent(client, info, info.original)
        self._connections.client_disconnected(client)

    def _report_unsent(
        self, client: connection.Client, info: ConnectionInfo, original: tuple[str, int]
    ) -> None:
        snap = self._store.get()
        learned = self._resolver.learned
        vetted = address_vetted(snap, address_of(original[0]), original[1], learned)
        decision = vetted.decision
        rec = self._record(
            snap,
            Vetted(decision, None),
            capture=Capture.TRANSPARENT,
            protocol="TCP",
            host=vetted.host,
            port=original[1],
            client=client,
        )
        rec.original_address = rec.peer_address = original[0]
        if decision.permits:
            rec.error = info.held_error or (None if info.held else "client sent no data")
        self._reporter.report(rec)
