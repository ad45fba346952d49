"""A request head refused before it was decided (limits, timeout, invalid framing), as the
reference engine refuses it (Decider.head_rejected, GuardedHttp1Server._refuse): one deny record
whatever the mode, our answer, then the connection half-closed and read (discarded) for a while,
so that the client reads the answer instead of a reset caused by its unread bytes."""

from __future__ import annotations

import asyncio

from sidecar.answers import denial_bytes
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.relay import shut_write
from sidecar.fastpath.services import Services
from sidecar.policy.model import Decision, Verdict
from sidecar.policy.store import Snapshot
from sidecar.policy.target import InvalidTarget, parse_request_target
from sidecar.proxy.headlimits import LINGER_SECONDS, HeadRejection, request_line_start
from sidecar.record import Capture, DecisionRecord

HEAD_SAMPLE = 8 * 1024 + 64  # enough of a refused head to read its method and target


def refusal_record(
    conn: ClientConnection,
    services: Services,
    rejection: HeadRejection,
    head: bytes,
    original: tuple[str, int] | None = None,
) -> DecisionRecord:
    """The deny record of a refused head (``original``: the transparent listener's original
    destination, which names the port when the head does not)."""
    return refused_head_record(
        services.store.get(),
        conn.capture,
        rejection,
        head,
        original=original,
        client_address=conn.peer,
    )


def refused_head_record(
    snap: Snapshot,
    capture: Capture,
    rejection: HeadRejection,
    head: bytes,
    *,
    original: tuple[str, int] | None,
    client_address: str | None,
) -> DecisionRecord:
    """The deny record of a refused head, for both engines: deny whatever the mode (such a
    head is never passed on), the target read from an absolute-form request line if any."""
    method, target = request_line_start(head)
    host: str | None = None
    port = original[1] if original is not None else 0
    if target is not None and "://" in target:
        try:
            parsed = parse_request_target(target)
        except InvalidTarget:
            pass
        else:
            host = parsed.authority.host or None
            port = parsed.port
    return DecisionRecord(
        decision=Decision(Verdict.DENY, rejection.reason, detail=rejection.detail),
        capture=capture,
        protocol=method or "HTTP",
        host=host,
        port=port,
        policy_source=snap.source,
        policy_version=snap.version,
        mode=snap.mode.value,
        original_address=original[0] if original is not None else None,
        client_address=client_address,
        method=method,
        status_code=rejection.status,
    )


def refuse_head(
    conn: ClientConnection,
    services: Services,
    rejection: HeadRejection,
    head: bytes,
    original: tuple[str, int] | None = None,
) -> None:
    """Record the refusal, answer it, and linger: the connection ends here."""
    rec = refusal_record(conn, services, rejection, head[:HEAD_SAMPLE], original)
    services.reporter.report(rec)
    conn.busy = False
    conn.cutter = None
    transport = conn.transport
    if transport is None or conn.closed:
        return
    transport.write(denial_bytes(rec, rejection.status))
    if conn.eof or not transport.can_write_eof():
        transport.close()
        return
    if shut_write(transport):
        conn.switch(Lingering(conn))


class Lingering:
    """A refused connection's last phase: what the client still sends is discarded until it
    closes or LINGER_SECONDS pass."""

    __slots__ = ("_conn", "_timer")

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, conn.close)
        if conn.transport is not None:
            conn.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass  # refused: nothing more is read into memory

    def eof_received(self) -> bool | None:
        self._timer.cancel()
        return False  # closes the transport once the answer is written

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass
