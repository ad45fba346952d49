"""tunload, the long-lived tunnels' load generator (bench/tunload.c), built with the system's C
compiler and run against an in-test CONNECT proxy and upstream on loopback: what it sends, what
it counts, and that each way it can fail stops it with a message."""

from __future__ import annotations

import shutil
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.loadgen import Generators, LoadError, build_tunload

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def _read_head(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One head (up to its blank line) from ``conn``, the rest kept in ``buf``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


class _Server:
    """A threaded TCP server on a free loopback port, its connections served by ``handle``."""

    server: socketserver.ThreadingTCPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def start(self) -> None:
        serve = self.handle

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Upstream(_Server):
    """Answers every request on a kept-alive connection with ``answer``; records the heads."""

    answer: bytes = OK
    heads: list[bytes] = field(default_factory=list)

    def handle(self, conn: socket.socket) -> None:
        buf = bytearray()
        while (head := _read_head(conn, buf)) is not None:
            self.heads.append(head)
            conn.sendall(self.answer)


@dataclass
class ConnectProxy(_Server):
    """A CONNECT proxy: ``refuse`` answers every CONNECT with 403, else 200 and a relay."""

    refuse: bool = False
    connects: list[bytes] = field(default_factory=list)

    def handle(self, conn: socket.socket) -> None:
        buf = bytearray()
        head = _read_head(conn, buf)
        if head is None:
            return
        self.connects.append(head)
        if self.refuse:
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        with socket.create_connection((host, int(port))) as up:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if buf:
                up.sendall(buf)
            threading.Thread(target=_copy, args=(up, conn), daemon=True).start()
            _copy(conn, up)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass


@pytest.fixture(scope="module")
def tunload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc")
    assert cc is not None, "a C compiler (apt-get install gcc) builds the bench's tunload"
    return build_tunload(cc, tmp_path_factory.mktemp("tunload"))


@pytest.fixture
def servers() -> Iterator[tuple[Upstream, ConnectProxy]]:
    up, proxy = Upstream(), ConnectProxy()
    up.start()
    proxy.start()
    yield up, proxy
    proxy.stop()
    up.stop()


def _gen(tunload: Path, tmp_path: Path) -> Generators:
    return Generators("wrk", "hey", "curl", (), tmp_path, tunload)


def test_requests_go_through_one_tunnel_per_connection(
    tunload: Path, tmp_path: Path, servers: tuple[Upstream, ConnectProxy]
) -> None:
    up, proxy = servers
    result = _gen(tunload, tmp_path).tunnel_http(
        upstream_port=up.port, proxy_port=proxy.port, connections=3, seconds=10, limit=300
    )
    # the count bound ends the run long before the time bound; one request in flight per
    # connection, so at most one answer per connection past the bound
    assert 300 <= result.ok <= 303
    assert result.errors == 0
    assert 0 < result.seconds < 10
    assert 0 < result.p50_ms <= result.p99_ms
    target = f"127.0.0.1:{up.port}".encode()
    assert proxy.connects == [b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target] * 3
    assert len(up.heads) >= result.ok  # every answer counted was asked for, inside a tunnel
    assert set(up.heads) == {b"GET / HTTP/1.1\r\nHost: " + target + b"\r\nUser-Agent: tunload"}


def test_direct_sends_the_requests_to_the_upstream(
    tunload: Path, tmp_path: Path, servers: tuple[Upstream, ConnectProxy]
) -> None:
    up, proxy = servers
    result = _gen(tunload, tmp_path).tunnel_http(
        upstream_port=up.port, proxy_port=None, connections=2, seconds=10, limit=50
    )
    assert 50 <= result.ok <= 52
    assert proxy.connects == []


def test_the_time_bound_ends_a_run(
    tunload: Path, tmp_path: Path, servers: tuple[Upstream, ConnectProxy]
) -> None:
    up, proxy = servers
    result = _gen(tunload, tmp_path).tunnel_http(
        upstream_port=up.port, proxy_port=proxy.port, connections=1, seconds=1, limit=10**9
    )
    assert result.ok > 0
    assert 1.0 <= result.seconds < 3.0


def test_non_2xx_answers_are_counted_as_errors(
    tunload: Path, tmp_path: Path, servers: tuple[Upstream, ConnectProxy]
) -> None:
    up, proxy = servers
    up.answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
    result = _gen(tunload, tmp_path).tunnel_http(
        upstream_port=up.port, proxy_port=proxy.port, connections=1, seconds=10, limit=20
    )
    assert (result.ok, result.errors) == (0, 20)


# (the proxy refuses, what the upstream answers, what the message names)
CANNOT_MEASURE = [
    (True, OK, "CONNECT answered 403"),
    # a response it cannot frame would make every later count wrong
    (False, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello", "Content-Length"),
    (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "Content"),
]


@pytest.mark.parametrize("case", CANNOT_MEASURE)
def test_what_it_cannot_measure_stops_it_with_a_message(
    tunload: Path,
    tmp_path: Path,
    servers: tuple[Upstream, ConnectProxy],
    case: tuple[bool, bytes, str],
) -> None:
    up, proxy = servers
    proxy.refuse, up.answer, message = case
    with pytest.raises(LoadError, match=message):
        _gen(tunload, tmp_path).tunnel_http(
            upstream_port=up.port, proxy_port=proxy.port, connections=2, seconds=5, limit=100
        )


def test_a_closed_connection_stops_it(tunload: Path, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def read_then_close() -> None:
            conn = listener.accept()[0]
            conn.recv(65536)  # the CONNECT: closed unread, it would be a reset
            conn.close()

        threading.Thread(target=read_then_close, daemon=True).start()
        with pytest.raises(LoadError, match="closed a connection"):
            _gen(tunload, tmp_path).tunnel_http(
                upstream_port=1, proxy_port=port, connections=1, seconds=5, limit=10
            )


def test_it_is_not_built_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="not built"):
        Generators("wrk", "hey", "curl", (), tmp_path).tunnel_http(
            upstream_port=1, proxy_port=2, connections=1, seconds=1, limit=1
        )


def test_a_source_that_does_not_compile_names_the_compiler_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="exited"):
        build_tunload("false", tmp_path)
