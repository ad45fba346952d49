"""The transparent listener's connections, with the reference engine's semantics and records
(sidecar.proxy.layering and Decider._decide_transparent_stream, hold_upstream, decide_held,
refuse_unreadable, _report_unsent):

- the destination the app dialled is the socket's original destination (SO_ORIGINAL_DST, set by
  the iptables REDIRECT); a connection without one was not redirected: closed, and a burst of
  them is one warning per interval;
- the client's whole first flight is read (bounded in time by --first-byte-timeout, in size by
  the classifier) before anything is decided: an HTTP request line goes to the plain-HTTP reader
  (each request decided on its Host), a ClientHello is decided on its SNI, anything else (raw
  TCP, TLS without SNI, ``PRI *``, a CONNECT to some other proxy) on the original address; what
  looks like TLS but cannot be read, or stops part-way at the bound, is refused; TLS is never
  decrypted;
- to an address a cidr rule allows, the upstream is opened at once (a server may speak first:
  its bytes reach the client) while the client's bytes are held until their decision;
- a silent client is decided at the bound as raw TCP on the original address; one that leaves
  before sending anything still gets its decision.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time

from sidecar.fastpath import http
from sidecar.fastpath.accept import LOG_INTERVAL_SECONDS
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.relay import Relay, Upstream
from sidecar.fastpath.services import Services
from sidecar.fastpath.upstream import UpstreamError, dial
from sidecar.fastpath.vetting import (
    Vetted,
    address_allows,
    address_vetted,
    held_vetted,
    stream_decision,
    vet,
    without_ca,
)
from sidecar.policy.model import Decision, Destination, IPAddress, Reason, Verdict
from sidecar.policy.store import Snapshot
from sidecar.proxy.hostnames import address_of
from sidecar.record import Capture, DecisionRecord
from sidecar.wire.first_flight import (
    MAX_FIRST_FLIGHT,
    FirstFlight,
    Flight,
    classify,
    looks_like_tls,
)

log = logging.getLogger(__name__)

# linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h
# IP6T_SO_ORIGINAL_DST: the same number, at the IPv4 and the IPv6 level.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = socket.IPPROTO_IPV6  # the socket module has no SOL_IPV6: the level is the protocol
_SOCKADDR_IN = struct.Struct("!2xH4s")  # family, port, address (then zero padding)
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s")  # family, port, flow info, address (then scope)


def sockaddr_in(raw: bytes) -> tuple[str, int]:
    """The (address, port) of a ``struct sockaddr_in`` as getsockopt returns it."""
    port, address = _SOCKADDR_IN.unpack_from(raw)
    return socket.inet_ntop(socket.AF_INET, address), int(port)


def sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """The (address, port) of a ``struct sockaddr_in6`` as getsockopt returns it."""
    port, address = _SOCKADDR_IN6.unpack_from(raw)
    return socket.inet_ntop(socket.AF_INET6, address), int(port)


class NotRedirectedError(OSError):
    pass


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the client was connecting before the REDIRECT; raises OSError when it was not
    redirected (no NAT entry: ENOENT; or the destination is this listener itself)."""
    local = sock.getsockname()
    # By the local address, not the socket's family: an IPv4 client of a dual-stack listener
    # is ::ffff:a.b.c.d, and its NAT entry is IPv4 (the wrong level fails, or worse).
    if "." in local[0]:
        original = sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
        here = (local[0].removeprefix("::ffff:"), int(local[1]))
    else:
        original = sockaddr_in6(sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28))
        here = (local[0], int(local[1]))
    if original == here:
        # Connection tracking without a NAT entry reports the listener: relaying there would
        # loop the connection into the proxy.
        raise NotRedirectedError("the original destination is the transparent listener itself")
    return original


class Unredirected:
    """One warning per interval for connections that were not redirected (any process in the
    pod can connect to the transparent port: a line each would let it flood the log)."""

    MESSAGE = (
        "closed connections to the transparent port that were not redirected there "
        "(no original destination)"
    )

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._last: float | None = None
        self._since = 0

    def note(self, error: str) -> bool:
        """Count one; True when a warning was logged for it."""
        self._since += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        times, self._since = self._since, 0
        log.warning(
            self.MESSAGE, extra={"times": times, "interval_s": self._interval, "error": error}
        )
        return True


UNREDIRECTED = Unredirected()


def start(conn: ClientConnection, services: Services) -> None:
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    try:
        original = original_destination(sock)
    except OSError as err:
        UNREDIRECTED.note(str(err) or type(err).__name__)
        conn.close()
        return
    Stream(conn, services, original).open()


class _HeldServer:
    """A held upstream's phase while the client's first flight is read: the server's bytes
    reach the client (a server that speaks first), its hang-up decides what was read."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def data_received(self, data: bytes) -> None:
        self._stream.server_data(data)

    def eof_received(self) -> bool | None:
        self._stream.server_gone()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.server_gone()

    def pause_writing(self) -> None:
        pass  # nothing is written upstream before the decision

    def resume_writing(self) -> None:
        pass


class Stream:
    """One redirected connection, from its first flight to the relay (or to the plain-HTTP
    reader); the client connection's phase until then, and its cutter while it lasts."""

    __slots__ = (
        "_connecting",
        "_data",
        "_deciding",
        "_dialing",
        "_held",
        "_held_error",
        "_inspecting",
        "_pending",
        "_relay",
        "_reported",
        "_start_ns",
        "_task",
        "_timer",
        "address",
        "conn",
        "original",
        "rec",
        "services",
        "upstream",
    )

    def __init__(
        self, conn: ClientConnection, services: Services, original: tuple[str, int]
    ) -> None:
        self.conn = conn
        self.services = services
        self.original = original
        self.address: IPAddress | None = address_of(original[0])
        self.upstream: Upstream | None = None
        self.rec: DecisionRecord | None = None
        self._data = b""  # the client's first flight so far
        self._pending = True  # its kind not known yet
        self._held = False  # the upstream opened before the first flight (cidr-allowed)
        self._held_error: str | None = None
        # An inspected SNI while the inspection CA is not available: the rule, to deny it.
        self._inspecting: str | None = None
        self._connecting = False
        self._deciding = False
        self._dialing = False
        self._start_ns = 0
        self._reported = False
        self._relay: Relay | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def open(self) -> None:
        self.conn.switch(self)
        self.conn.cutter = self
        snap = self.services.store.get()
        if address_allows(snap, self.address, self.original[1], self.services.resolver.learned):
            self._held = True
            self._connecting = True
            self._task = asyncio.get_running_loop().create_task(self._hold())
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        timeout = self.services.config.first_byte_timeout
        if timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _new_upstream(self) -> Upstream:
        self.upstream = Upstream()
        return self.upstream

    # -- held upstreams (cidr-allowed addresses) ------------------------------------------------

    async def _hold(self) -> None:
        try:
            await dial(
                self.original[0],
                self.original[1],
                self._new_upstream,
                self.services.config.connect_timeout,
            )
        except UpstreamError as err:
            # As the reference: the client is closed, and its decision (by address, as raw TCP)
            # says why.
            self._held_error = err.message
            self._unsent()
            self._close_both()
            return
        except asyncio.CancelledError:
            if self.upstream is not None:
                self.upstream.abort()
            raise
        finally:
            self._connecting = False
        upstream = self.upstream
        assert upstream is not None
        if self.conn.closed or self.conn.eof:
            self._unsent()
            self._close_both()
            return
        # The first-flight bound runs from here, as in the reference (the connect came first).
        self._arm_timer()
        if self._data:
            self._classify()  # what the client sent while the upstream was being opened
        if self._pending:
            upstream.switch(_HeldServer(self))

    def server_data(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is not None and not self.conn.closed:
            transport.write(data)  # the server speaks first

    def server_gone(self) -> None:
        if self._pending:
            self._decide_now()  # the server hung up before the client spoke

    # -- the first flight ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._data += data
        if self._pending and not self._connecting:
            self._classify()
        elif len(self._data) > MAX_FIRST_FLIGHT and self.conn.transport is not None:
            self.conn.transport.pause_reading()  # being decided: the rest waits in the kernel

    def _classify(self) -> None:
        flight = classify(self._data)
        if flight is not None:
            self._decided(flight)

    def _timed_out(self) -> None:
        self._timer = None
        if self._pending and not self._connecting:
            self._decide_now()

    def _decide_now(self) -> None:
        """Nothing decidable within the bound. Silence: raw TCP on the original address (a
        server-speaks-first protocol). A partial first flight: refused, since what it would
        reveal (an SNI, a Host) was never decided."""
        data = self._data
        if data:
            problem = f"the first flight stopped after {len(data)} bytes"
            tls = looks_like_tls(data)  # what the classifier reads as TLS, recorded as TLS
            self._decided(FirstFlight(Flight.UNREADABLE, problem=problem, tls=tls))
        else:
            self._decided(FirstFlight(Flight.OTHER))

    def _decided(self, flight: FirstFlight) -> None:
        self._pending = False
        self._stop_timer()
        if flight.kind is Flight.UNREADABLE:
            self._refuse_unreadable("TLS" if flight.tls else "TCP", flight.problem)
            return
        if flight.kind is Flight.HTTP:
            # Each request opens its own upstream, to the vetted address of its Host: the held
            # connection would only sit idle.
            if self.upstream is not None:
                self.upstream.close()
            self.conn.cutter = None
            data, self._data = self._data, b""
            http.start_transparent(self.conn, self.services, self.original, data)
            return
        kind = "TLS" if flight.kind is Flight.TLS else "TCP"
        sni = flight.sni if kind == "TLS" else None
        if sni is not None and not self._held and self._inspect(sni):
            return
        self.conn.busy = True  # a stream: a drain waits for it
        if self._held:
            self._decide_held(kind, sni)
        else:
            self._deciding = True
            self._task = asyncio.get_running_loop().create_task(self._decide_and_dial(kind, sni))

    def _inspect(self, sni: str) -> bool:
        """A ClientHello to a host a rule inspects: handed to mitmproxy with its bytes (True),
        or, while the CA is not available, decided here and denied (fail closed). A held
        connection (its address allowed by a cidr rule, which then decides) is not inspected."""
        services = self.services
        self._inspecting = services.store.get().inspection(sni, self.original[1])
        if self._inspecting is None or not services.config.inspection_available:
            return False
        self.conn.cutter = None
        data, self._data = self._data, b""
        services.second_tier.hand_over(self.conn, data, "inspect")
        return True

    # -- decisions ------------------------------------------------------------------------------

    def _record(self, snap: Snapshot, vetted: Vetted, kind: str, sni: str | None) -> DecisionRecord:
        rec = DecisionRecord(
            decision=vetted.decision,
            capture=Capture.TRANSPARENT,
            protocol=kind,
            host=(sni if kind == "TLS" else None) or vetted.host,
            port=self.original[1],
            policy_source=snap.source,
            policy_version=snap.version,
            mode=snap.mode.value,
            peer_address=vetted.peer,
            client_address=self.conn.peer,
        )
        rec.original_address = self.original[0]
        rec.tls_passthrough = kind == "TLS"
        return rec

    def _decide_held(self, kind: str, sni: str | None) -> None:
        """A held connection, decided on what its first flight revealed (Decider.decide_held)."""
        snap = self.services.store.get()
        by_sni = sni if kind == "TLS" else None
        learned = self.services.resolver.learned
        vetted = held_vetted(snap, by_sni, self.address, self.original[1], learned)
        self.rec = self._record(snap, vetted, kind, by_sni)
        self.rec.error = self._held_error
        self._report()
        if not vetted.decision.permits:
            self._close_both()
            return
        self._relay_now()

    async def _decide_and_dial(self, kind: str, sni: str | None) -> None:
        try:
            await self._vet_and_dial(kind, sni)
        except asyncio.CancelledError:
            if self.upstream is not None:
                self.upstream.abort()
            self._report()  # the client left (or the sidecar stops): as it stood
            raise
        except Exception:
            log.exception("a transparent stream failed")
            self._report()
            self._close_both(abort=True)

    async def _vet_and_dial(self, kind: str, sni: str | None) -> None:
        """Decider._decide_transparent_stream, then the connect and its outcome."""
        self._start_ns = time.time_ns()
        services = self.services
        snap = services.store.get()
        port = self.original[1]
        by_sni = kind == "TLS" and sni is not None
        inspected = self._inspecting is not None
        if by_sni and address_allows(snap, self.address, port):
            decision = stream_decision(snap, sni, self.address, port, inspected=inspected)
            vetted = Vetted(decision, self.address)
        elif by_sni:
            dest = Destination(sni, port, inspected=inspected)
            vetted = await vet(services.resolver, snap, dest)
        else:
            raw = Destination(None, port, self.address)
            vetted = await vet(services.resolver, snap, raw, learned=services.resolver.learned)
        if inspected:
            ca = services.config.inspection
            vetted = without_ca(vetted, self._inspecting, ca.problem if ca else None, snap.mode)
        rec = self.rec = self._record(snap, vetted, kind, sni)
        if not vetted.decision.permits or vetted.address is None:
            if rec.peer_address is None:
                rec.peer_address = self.original[0]
            self._report()
            self._close_both()  # not one byte went upstream
            return
        if self.conn.closed:
            self._report()
            return
        self._dialing = True
        try:
            await dial(
                str(vetted.address), port, self._new_upstream, services.config.connect_timeout
            )
        except UpstreamError as err:
            rec.error = err.message  # allowed, but the destination could not be reached
            self._report()
            self._close_both()
            return
        finally:
            self._deciding = self._dialing = False
        self._report()
        if self.conn.closed:
            self._close_both()
            return
        self._relay_now()

    def _refuse_unreadable(self, kind: str, problem: str | None) -> None:
        """Looks like TLS (or a request line) but nothing readable within the bounds: refused
        whatever the address or the mode (a server might read a name that was never decided)."""
        snap = self.services.store.get()
        decision = Decision(Verdict.DENY, Reason.UNREADABLE_FIRST_FLIGHT, detail=problem)
        self.rec = self._record(snap, Vetted(decision, None), kind, None)
        self.rec.peer_address = self.original[0]
        self._report()
        self._close_both()

    def _unsent(self) -> None:
        """The client left before its first flight was read (or the held connect failed): its
        decision by the original address, as raw TCP (Decider._report_unsent)."""
        snap = self.services.store.get()
        port = self.original[1]
        vetted = address_vetted(snap, self.address, port, self.services.resolver.learned)
        decision = vetted.decision
        rec = self.rec = self._record(snap, Vetted(decision, None, vetted.host), "TCP", None)
        rec.peer_address = self.original[0]
        if decision.permits:
            rec.error = self._held_error or (None if self._held else "client sent no data")
        self._report()

    # -- relay, report, end ---------------------------------------------------------------------

    def _relay_now(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        data, self._data = self._data, b""
        started = self.services.reporter.relay_started()
        # A held connection (cidr-allowed, dialled before its first flight) has no start yet:
        # its tunnel metrics count from here. (Its decision was reported already.)
        self._start_ns = self._start_ns or started
        self._relay = Relay(self.conn, upstream, self._relay_ended)
        self._relay.start(to_server=data)

    def _relay_ended(self) -> None:
        self.conn.busy = False
        self.conn.cutter = None
        # Metrics: the tunnel's lifetime and its upstream connection's bytes (once, here).
        assert self.rec is not None and self.upstream is not None
        self.services.reporter.relay_ended(self.rec, self._start_ns, self.upstream.transport)

    def _report(self) -> None:
        if self._reported or self.rec is None:
            return
        self._reported = True
        self.services.reporter.report(self.rec, start_ns=self._start_ns or None)

    def _close_both(self, abort: bool = False) -> None:
        self._pending = False
        self._stop_timer()
        self.conn.busy = False
        self.conn.cutter = None
        if abort:
            self.conn.abort()
        else:
            self.conn.close()
        if self.upstream is not None:
            if abort:
                self.upstream.abort()
            else:
                self.upstream.close()

    # -- the client connection's phase until the relay ----------------------------------------

    def eof_received(self) -> bool | None:
        if self._pending:
            # Closed before its first flight was decided: the reference closes such a client.
            self._ended_unsent()
            return False
        return True  # being decided: the relay passes the EOF on after the first flight

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._pending:
            self._ended_unsent()
        elif self._dialing and self._task is not None:
            self._task.cancel()  # while dialling: reports as it stood
        # While vetting: _vet_and_dial sees the connection closed once the decision is made.

    def _ended_unsent(self) -> None:
        if self._task is not None and self._connecting:
            self._task.cancel()
        self._unsent()
        self._close_both()

    def pause_writing(self) -> None:
        # A held upstream that speaks first faster than the client reads: it waits.
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def cut(self, message: str) -> None:
        """The sidecar is stopping: what is still open ends here (reported as it stood)."""
        self._stop_timer()
        if self._relay is not None:
            self._relay.cut()
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._pending:
            self._unsent()
        self._report()
        self._close_both(abort=True)
