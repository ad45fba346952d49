"""Misbehaving peers for fault tests: an upstream that resets, hangs or streams a lot, an OTLP
"collector" that accepts and never answers, and the sidecar's own memory and descriptors.

All listen on loopback only. Every connection is counted while it is open, so a test can check
that the proxy let go of an upstream connection once its client went away.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.sockets import HEAD_END, recv_head, serve_each

_CHUNK = 1 << 20
_PATH = re.compile(rb"^[A-Z]+ (?:[a-z]+://[^/ ]*)?(/[^ ]*) HTTP/1\.[01]\r\n")


@dataclass
class Live:
    """Connections a server accepted, and how many are still open."""

    accepted: int = 0
    open: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_open(self, count: int, timeout: float) -> int:
        """Wait until at most ``count`` connections are open; returns how many are."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.open > count and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            return self.open


class FaultyUpstream:
    """A plain-HTTP (or TLS) upstream whose behaviour is chosen by the request path.

    ``/stream/N``  200 with N bytes of body, written as fast as the reader takes them
    ``/reset/N``   200 promising 1 GiB, N bytes of body, then a TCP reset (SO_LINGER 0)
    ``/hang``      reads the request and never answers; holds the socket until the peer closes
    anything else  200 with a short body
    """

    def __init__(self, host: str, *, tls: tuple[Path, Path] | None = None) -> None:
        self.live = Live()
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self._sock = socket.create_server((host, 0), backlog=128)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self._payload = bytes(_CHUNK)
        serve_each(self._sock, self._serve, on_accept=self._count, name="faulty-upstream")

    def _count(self, conn: socket.socket) -> None:
        with self.live.cond:
            self.live.accepted += 1
            self.live.open += 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            head = recv_head(conn, limit=65536, bufsize=4096)
            if HEAD_END not in head and len(head) < 65536:  # closed before a whole head
                return
            match = _PATH.match(head)
            path = match.group(1).decode() if match else "/"
            if path.startswith("/stream/"):
                self._stream(conn, int(path.rsplit("/", 1)[1]))
            elif path.startswith("/reset/"):
                self._reset(conn, int(path.rsplit("/", 1)[1]))
            elif path == "/hang":
                while conn.recv(4096):  # until the proxy closes its side
                    pass
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                while conn.recv(4096):
                    pass
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self.live.cond:
                self.live.open -= 1
                self.live.cond.notify_all()

    def _stream(self, conn: socket.socket, size: int) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            + f"content-length: {size}\r\n\r\n".encode()
        )
        view = memoryview(self._payload)
        left = size
        while left > 0:
            n = min(left, _CHUNK)
            conn.sendall(view[:n])
            left -= n
        while conn.recv(4096):
            pass

    def _reset(self, conn: socket.socket, sent: int) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n" + bytes(sent),
        )
        time.sleep(0.05)  # let the bytes leave before the reset discards the send queue
        # Closing with a zero linger time sends a RST (and, over TLS, no close_notify).
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def stop(self) -> None:
        self._sock.close()


class Blackhole:
    """Accepts connections and reads whatever comes, never answering: a hung collector."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.live = Live()
        self.received = 0
        self._sock = socket.create_server((host, 0), backlog=128)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self._conns: list[socket.socket] = []
        serve_each(self._sock, self._drain, on_accept=self._count, name="blackhole")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _count(self, conn: socket.socket) -> None:
        with self.live.cond:
            self.live.accepted += 1
            self.live.open += 1
            self._conns.append(conn)

    def _drain(self, conn: socket.socket) -> None:
        try:
            while chunk := conn.recv(65536):
                with self.live.cond:
                    self.received += len(chunk)
        except OSError:
            pass
        finally:
            with self.live.cond:
                self.live.open -= 1
                self.live.cond.notify_all()

    def stop(self) -> None:
        self._sock.close()
        with self.live.cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class RssSampler:
    """Samples a process's RSS in the background; ``peak`` is the highest value seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.start = self.peak = rss_bytes(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError, ValueError):
            self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak


class FlakyFront:
    """A TCP relay in front of a server (the test API server), which can be told to answer
    every new request itself with an error status instead, as an overloaded or broken API
    server does (500, 429 with Retry-After). Switching modes cuts the relayed connections, so
    that an open watch has to come back and meet the new behaviour.
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.failing: int | None = None
        self.answered = 0  # error answers given
        self._lock = threading.Lock()
        self._relayed: list[socket.socket] = []
        self._sock = socket.create_server((host, 0), backlog=64)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        serve_each(self._sock, self._serve, name="flaky-front")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail_with(self, status: int | None) -> None:
        """Answer new requests with ``status`` (None: relay again); cut what is relayed now."""
        with self._lock:
            self.failing = status
            relayed, self._relayed = self._relayed, []
        for sock in relayed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            status = self.failing
        if status is None:
            self._relay(conn)
            return
        with contextlib.closing(conn):
            if HEAD_END not in recv_head(conn):
                return
            reason = {429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "Error")
            body = (
                '{"kind":"Status","apiVersion":"v1","status":"Failure",'
                f'"message":"{reason.lower()}","reason":"{reason.replace(" ", "")}",'
                f'"code":{status}}}'
            ).encode()
            with self._lock:
                self.answered += 1
            with contextlib.suppress(OSError):
                answer = (
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                    f"retry-after: 1\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n"
                )
                conn.sendall(answer.encode() + body)

    def _relay(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._relayed += [conn, upstream]

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)
        conn.close()
        upstream.close()

    def stop(self) -> None:
        self._sock.close()
        self.fail_with(None)
