"""Raw-socket pieces the hand-written test peers share: reading a head, serving each connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

HEAD_END = b"\r\n\r\n"


def recv_head(
    sock: socket.socket, end: bytes = HEAD_END, *, limit: int | None = None, bufsize: int = 65536
) -> bytes:
    """What ``sock`` receives until ``end`` is in it, the peer closes, or ``limit`` bytes came.
    It does not raise on a close: the caller checks ``end in result`` where a whole head is due.
    """
    data = b""
    while end not in data and (limit is None or len(data) < limit):
        chunk = sock.recv(bufsize)
        if not chunk:
            break
        data += chunk
    return data


def serve_each(
    sock: socket.socket,
    handle: Callable[[socket.socket], None],
    *,
    on_accept: Callable[[socket.socket], None] | None = None,
    name: str | None = None,
) -> None:
    """Accept on ``sock`` in a daemon thread until it is closed; each connection goes to
    ``handle`` in a thread of its own, after ``on_accept`` (run in the accepting thread, so a
    count it keeps is up to date before the connection is served)."""

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if on_accept is not None:
                on_accept(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True, name=name).start()
