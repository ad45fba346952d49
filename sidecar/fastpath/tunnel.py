"""Explicit CONNECT tunnels on the fast path, with the reference engine's semantics and records
(Decider.http_connect, settle_tunnel, server_connected, server_connect_error; tunnels.py):

- decided on the CONNECT authority; denied: 403 (our answer) and closed;
- allowed: the vetted address is dialled (bounded by --connect-timeout) BEFORE the answer: a
  failed connect is answered 502/504 with the decision headers, a connected one
  ``200 Connection established`` (the reference's bytes: no header at all);
- the tunnel's first flight is peeked, never decrypted (sidecar.wire.first_flight): a ClientHello
  naming another host than the CONNECT is refused (sni mismatch; audit mode lets it through and
  says so), an unreadable one is refused whatever the mode, and not one byte of either reaches
  the upstream; the server may speak first (then no ClientHello is awaited);
- one span and decision line per tunnel, reported when the first flight settles it (or when the
  connect fails, or the client leaves before: as it stood).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sidecar.answers import (
    answer_headers,
    connect_failure_body,
    denial_bytes,
    failure_phrase,
    failure_status,
    render,
)
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.refusal import Lingering
from sidecar.fastpath.relay import EARLY_LIMIT, Relay, Upstream, shut_write
from sidecar.fastpath.services import Services
from sidecar.fastpath.upstream import Connect, UpstreamError
from sidecar.fastpath.vetting import Vetted, tunnel_denial, vet, vet_now, without_ca
from sidecar.policy.model import Destination
from sidecar.policy.store import Snapshot
from sidecar.record import DecisionRecord
from sidecar.wire.connect_head import ConnectRequest
from sidecar.wire.first_flight import MAX_FIRST_FLIGHT, FirstFlight, Flight, classify_tls

log = logging.getLogger(__name__)


def established(http_version: str) -> bytes:
    # mitmproxy's answer to a CONNECT (handle_connect_finish): the request's version, the reason
    # phrase, no header (Android's emulator proxying breaks on any).
    return f"{http_version} 200 Connection established\r\n\r\n".encode("ascii")


def failure_answer(rec: DecisionRecord, error: UpstreamError) -> bytes:
    """502/504 for a CONNECT whose upstream could not be reached (tunnels.py's answer)."""
    status = failure_status(error.error_type)
    reason = failure_phrase(error.error_type)
    return render(
        status,
        connect_failure_body(rec, reason, error.message),
        answer_headers(rec, reason, error.error_type),
    )


class _ServerWhilePeeking:
    """The upstream's phase between the 200 and the first flight's settling."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self._tunnel.server_data(data)

    def eof_received(self) -> bool | None:
        self._tunnel.server_data(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel.server_lost()

    def pause_writing(self) -> None:
        pass  # nothing is written upstream before the settling

    def resume_writing(self) -> None:
        pass


class Tunnel:
    """One CONNECT, from its decision to the relay; the client connection's phase until then,
    and its cutter for as long as it lasts."""

    __slots__ = (
        "_connect",
        "_dialing",
        "_flight",
        "_held",
        "_inspecting",
        "_peeking",
        "_relay",
        "_reported",
        "_server_spoke",
        "_start_ns",
        "_task",
        "_timer",
        "conn",
        "rec",
        "request",
        "services",
        "upstream",
    )

    def __init__(
        self,
        conn: ClientConnection,
        services: Services,
        request: ConnectRequest,
        flight: bytes,
    ) -> None:
        self.conn = conn
        self.services = services
        self.request = request
        self.rec: DecisionRecord | None = None
        self.upstream: Upstream | None = None
        self._flight = flight  # what the client sent after the CONNECT head
        self._held = b""  # what the server sent before the settling
        self._server_spoke = False
        self._start_ns = time.time_ns()
        self._reported = False
        self._dialing = False
        self._peeking = False
        self._relay: Relay | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None  # resolving a name first
        self._connect: Connect[Upstream] | None = None
        # An inspected host reaches this tunnel only while the inspection CA is not available
        # (explicit.py hands the others to mitmproxy): the inspecting rule, to deny it.
        self._inspecting: str | None = None

    def open(self, snap: Snapshot, inspecting: str | None) -> None:
        """Decide the CONNECT on ``snap``; ``inspecting``: the rule inspecting its host, as the
        caller read it there (``Snapshot.inspection``)."""
        conn = self.conn
        conn.busy = True  # being decided, connected, then relayed: a drain waits for it
        conn.cutter = self
        conn.switch(self)
        services, request = self.services, self.request
        self._inspecting = inspecting
        dest = Destination(request.host, request.port, inspected=self._inspecting is not None)
        vetted = vet_now(snap, dest, services.resolver)
        if vetted is not None:
            self._guarded(self._decided, snap, vetted)  # decided without waiting: no task
        else:
            self._task = asyncio.get_running_loop().create_task(self._resolve(snap, dest))

    # -- decision and connect -----------------------------------------------------------------

    async def _resolve(self, snap: Snapshot, dest: Destination) -> None:
        """A name to resolve before the decision (none cached)."""
        try:
            vetted = await vet(self.services.resolver, snap, dest)
        except asyncio.CancelledError:
            self._report()  # the client left (or the sidecar is stopping) meanwhile
            raise
        except Exception:
            log.exception("a CONNECT tunnel failed")
            self._close_both(abort=True)
            return
        self._task = None
        self._guarded(self._decided, snap, vetted)

    def _guarded[*A](self, step: Callable[[*A], None], *args: *A) -> None:
        """A step of the setup run from a callback: whatever goes wrong ends this tunnel (as the
        task's handler did), never the loop's turn."""
        try:
            step(*args)
        except Exception:
            log.exception("a CONNECT tunnel failed")
            self._report()
            self._close_both(abort=True)

    def _decided(self, snap: Snapshot, vetted: Vetted) -> None:
        services, request, conn = self.services, self.request, self.conn
        if self._inspecting is not None:
            ca = services.config.inspection
            vetted = without_ca(vetted, self._inspecting, ca.problem if ca else None, snap.mode)
        rec = self.rec = DecisionRecord(
            decision=vetted.decision,
            capture=conn.capture,
            protocol="CONNECT",
            host=request.host,
            port=request.port,
            policy_source=snap.source,
            policy_version=snap.version,
            mode=snap.mode.value,
            peer_address=vetted.peer,
            client_address=conn.peer,
            method="CONNECT",
        )
        if not vetted.decision.permits or vetted.peer is None:
            rec.status_code = 403
            self._report()
            self._answer(denial_bytes(rec))
            return
        rec.tls_passthrough = True
        if conn.closed:
            self._report()  # the client left while it was decided
            return
        self._dialing = True
        self._connect = Connect(
            vetted.peer,
            request.port,
            self._new_upstream,
            services.config.connect_timeout,
            lambda error: self._guarded(self._dialled, error),
        )

    def _dialled(self, error: UpstreamError | None) -> None:
        self._dialing = False
        self._connect = None
        rec, conn = self.rec, self.conn
        assert rec is not None
        if error is not None:
            # Allowed, but the destination could not be reached: the span says so.
            rec.error = error.message
            rec.status_code = failure_status(error.error_type)
            self._report()
            self._answer(failure_answer(rec, error))
            return
        rec.status_code = 200
        if conn.closed:
            self._report()
            self._close_both()
            return
        assert conn.transport is not None
        conn.transport.write(established(self.request.http_version))
        self._start_peeking()

    def _new_upstream(self) -> Upstream:
        self.upstream = Upstream()
        return self.upstream

    def _answer(self, answer: bytes) -> None:
        """Our answer to a CONNECT that opens no tunnel; the connection ends with it."""
        conn = self.conn
        conn.busy = False
        conn.cutter = None
        if conn.closed or conn.transport is None:
            return
        conn.transport.write(answer)
        if conn.eof or not conn.transport.can_write_eof():
            conn.close()
            return
        if shut_write(conn.transport):
            conn.switch(Lingering(conn))

    # -- the first flight ---------------------------------------------------------------------

    def _start_peeking(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        self._peeking = True
        upstream.switch(_ServerWhilePeeking(self))
        if self._peeking and self._flight:
            self._peek()  # sent along with the CONNECT
        if self._peeking and self.conn.eof:
            # Half-closed before its first flight was whole: the reference closes such a client.
            self._report()
            self._close_both()
            return
        if self._peeking:
            # A partial first flight is refused at the bound; a silent tunnel waits as it would
            # in the reference (settling it by timer would let a ClientHello sent later pass
            # without its SNI being checked).
            timeout = self.services.config.first_byte_timeout
            if timeout > 0:
                self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def _peek(self) -> None:
        flight = classify_tls(self._flight)
        if flight is not None:
            self._settle(flight)
        elif not self._flight and self._server_spoke:
            self._settle(None)  # the server spoke first: no ClientHello is coming

    def server_data(self, data: bytes) -> None:
        self._server_spoke = True
        self._held += data
        upstream = self.upstream
        if len(self._held) > EARLY_LIMIT and upstream is not None and upstream.transport:
            upstream.transport.pause_reading()  # the relay resumes it
        if self._peeking:
            self._peek()

    def server_lost(self) -> None:
        if self._peeking:
            self._report()
            self._close_both()

    def _timed_out(self) -> None:
        self._timer = None
        if self._peeking and self._flight:
            problem = (
                f"no complete ClientHello within {self.services.config.first_byte_timeout:g} s "
                f"({len(self._flight)} bytes)"
            )
            self._settle(FirstFlight(Flight.UNREADABLE, problem=problem))

    def _settle(self, flight: FirstFlight | None) -> None:
        """Decide the tunnel for good (Decider.settle_tunnel), then relay or refuse it."""
        self._peeking = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rec, upstream = self.rec, self.upstream
        assert rec is not None and upstream is not None
        denial = tunnel_denial(rec, flight)
        if denial is not None:
            rec.decision = denial
        self._report()
        if not rec.decision.permits:
            self._close_both()
            return
        flight_bytes, held = self._flight, self._held
        self._flight = self._held = b""
        self.services.reporter.relay_started()
        self._relay = Relay(self.conn, upstream, self._relay_ended)
        self._relay.start(to_server=flight_bytes, to_client=held)

    def _relay_ended(self) -> None:
        self.conn.busy = False
        self.conn.cutter = None
        # Metrics: the tunnel's lifetime and its upstream connection's bytes (once, here).
        assert self.rec is not None and self.upstream is not None
        self.services.reporter.relay_ended(self.rec, self._start_ns, self.upstream.transport)

    # -- the client connection's phase until the relay ----------------------------------------

    def data_received(self, data: bytes) -> None:
        self._flight += data
        if self._peeking:
            self._peek()
        elif len(self._flight) > MAX_FIRST_FLIGHT and self.conn.transport is not None:
            # Sent ahead of the answer: no more is read until the tunnel is up.
            self.conn.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self._peeking:
            # The client closed before its first flight was read: ended, as it stood.
            self._report()
            self._close_both()
            return False
        return True  # still being decided: the answer can be written

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dialing:
            self._stop_dialling()  # reports as it stood
        elif self._peeking:
            self._peeking = False
            self._report()
            self._close_both()
        # Still being decided (a name resolving): _decided sees the connection closed.

    def pause_writing(self) -> None:
        pass  # only the answer is written before the relay

    def resume_writing(self) -> None:
        pass

    # -- reporting and ending -----------------------------------------------------------------

    def _report(self) -> None:
        if self._reported or self.rec is None:
            return
        self._reported = True
        self.services.reporter.report(self.rec, start_ns=self._start_ns)

    def _close_both(self, abort: bool = False) -> None:
        self._peeking = False
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

    def cut(self, message: str) -> None:
        """The sidecar is stopping: what is still open ends here (reported as it stood)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._relay is not None:
            self._relay.cut()
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._dialing:
            self._stop_dialling()
        self._report()
        self._close_both(abort=True)

    def _stop_dialling(self) -> None:
        """The connect in progress abandoned (the client left, or the sidecar stops): reported
        as it stood."""
        self._dialing = False
        if self._connect is not None:
            self._connect.cancel()
            self._connect = None
        self._report()
