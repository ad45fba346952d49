"""Plain HTTP/1 on the fast path (`egress-sidecar run`, default engine): pooled keep-alive
upstreams, pipelining in order, every response framing, invalid responses, handovers to
mitmproxy, and the drain's ``connection: close``."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.support.faults import rss_bytes
from tests.support.otlp import OtlpHttpReceiver
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.sockets import recv_head, serve_each
from tests.support.upstream import UpstreamServer

WEB = "127.0.0.71"
RAW = "127.0.0.72"


class Scripted:
    """A raw upstream: each connection reads one request head and sends what ``answer`` says
    for its path (bytes; the connection then closes unless the answer ends with b"<keep>")."""

    def __init__(self, answers: dict[str, Callable[[socket.socket], None]]) -> None:
        self.sock = socket.create_server((RAW, 0))
        self.port = int(self.sock.getsockname()[1])
        self.answers = answers
        self.connections = 0
        serve_each(self.sock, self._one, on_accept=self._count)

    def _count(self, _: socket.socket) -> None:
        self.connections += 1

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            head = recv_head(conn)
            match = re.match(rb"[A-Z]+ (/\S*) ", head)
            if match is None:
                return
            self.answers[match.group(1).decode()](conn)

    def stop(self) -> None:
        self.sock.close()


def _send(data: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(data)

    return answer


ANSWERS = {
    "/early": _send(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
    "/nocontent": _send(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"),
    "/notmodified": _send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    "/head": _send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    "/eof": _send(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"),
    "/chunked": _send(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n"
    ),
    "/garbage": _send(b"HTTP/1.1 2OO OK\r\n\r\n"),
    "/smuggle": _send(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "/switch": _send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
}


@dataclass
class World:
    sidecar: Sidecar
    web: UpstreamServer
    raw: Scripted
    otlp: OtlpHttpReceiver


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, otlp_http: OtlpHttpReceiver) -> Iterator[World]:
    web = UpstreamServer(WEB).start()
    raw = Scripted(ANSWERS)
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("fast-http"),
        allowlist=(
            f"allow:\n  - host: web.test\n    ports: [{web.server_port}]\n"
            f"  - host: raw.test\n    ports: [{raw.port}]\n"
        ),
        hosts={"web.test": WEB, "raw.test": RAW},
        args=["--allow-private-range", "127.0.0.0/8"],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    yield World(sidecar, web, raw, otlp_http)
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    web.stop()
    raw.stop()


def _exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
    return answer


def _raw_get(world: World, path: str, method: str = "GET") -> bytes:
    target = f"http://raw.test:{world.raw.port}{path}"
    head = f"{method} {target} HTTP/1.1\r\nHost: raw.test:{world.raw.port}\r\nConnection: close"
    return _exchange(world.sidecar.explicit_port, f"{head}\r\n\r\n".encode())


def test_keep_alive_upstream_connections_are_pooled_across_clients(world: World) -> None:
    url = f"http://web.test:{world.web.server_port}/pooled"
    before = world.web.seen.connections
    for _ in range(5):  # a new client connection each time: the upstream one is kept
        with requests.Session() as session:
            session.proxies = {"http": world.sidecar.proxy_url}
            for _ in range(4):
                assert session.get(url, timeout=5).status_code == 200
    assert world.web.seen.connections - before == 1


def test_pipelined_requests_are_answered_in_order(world: World) -> None:
    port = world.web.server_port
    heads = b"".join(
        f"GET http://web.test:{port}/p{i} HTTP/1.1\r\nHost: web.test:{port}\r\n\r\n".encode()
        for i in range(5)
    )
    last = f"GET http://web.test:{port}/p5 HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"
    answer = _exchange(world.sidecar.explicit_port, heads + last.encode())
    paths = [p.decode() for p in re.findall(rb'"path": "([^"]*)"', answer)]
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 6
    assert paths == [f"/p{i}" for i in range(6)], answer[-500:]


def test_a_1xx_is_relayed_before_the_final_response(world: World) -> None:
    answer = _raw_get(world, "/early")
    assert answer.startswith(b"HTTP/1.1 103 Early Hints\r\n"), answer
    assert b"\r\n\r\nHTTP/1.1 200 OK\r\n" in answer and answer.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    ("path", "method", "status", "body"),
    [
        ("/nocontent", "GET", 204, b""),
        ("/notmodified", "GET", 304, b""),
        ("/head", "HEAD", 200, b""),
        ("/eof", "GET", 200, b"until the end"),
        ("/chunked", "GET", 200, b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"),
    ],
    ids=["204", "304", "head", "close-delimited", "chunked"],
)
def test_every_response_framing_is_relayed(
    world: World, path: str, method: str, status: int, body: bytes
) -> None:
    answer = _raw_get(world, path, method)
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.%c %d" % (head[7], status)), answer
    assert got == body


@pytest.mark.parametrize("path", ["/garbage", "/smuggle", "/switch"])
def test_an_invalid_response_is_a_502_of_ours(world: World, path: str) -> None:
    answer = _raw_get(world, path)
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b"x-egress-decision: allow" in answer and b"x-egress-error: upstream_error" in answer
    span = world.otlp.sink.wait_for(lambda s: str(s.attributes.get("url.full", "")).endswith(path))[
        -1
    ]
    assert span.attributes["http.response.status_code"] == 502
    assert "invalid response" in str(span.attributes["egress.upstream.error"])


def test_expect_100_continue_is_answered_on_the_fast_path(world: World) -> None:
    port = world.web.server_port
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=5) as s:
        s.sendall(
            f"POST http://web.test:{port}/expect HTTP/1.1\r\nHost: web.test:{port}\r\n"
            "Expect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n".encode()
        )
        assert recv_head(s) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body byte
        s.sendall(b"hello")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    seen = world.web.seen.requests[-1]
    assert seen["path"] == "/expect" and seen["body_len"] == 5 and "expect" not in seen["headers"]


def test_upgrade_is_handed_to_mitmproxy(world: World) -> None:
    port = world.web.server_port
    for extra in ("Connection: upgrade\r\nUpgrade: h2c\r\n", "Expect: something-else\r\n"):
        head = (
            f"POST http://web.test:{port}/handed HTTP/1.1\r\nHost: web.test:{port}\r\n{extra}"
            "Content-Length: 2\r\nConnection: close\r\n\r\nhi"
        )
        answer = _exchange(world.sidecar.explicit_port, head.encode(), timeout=15)
        assert re.search(rb"HTTP/1.1 (200 OK|417 )", answer), answer
    loads = [line for line in world.sidecar.stderr if "loaded mitmproxy" in line]
    assert len(loads) == 1 and "Upgrade" in loads[0], loads
    assert [r for r in world.web.seen.requests if r["path"] == "/handed"]


def test_a_response_during_the_drain_says_connection_close(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    raw_sock = socket.create_server((RAW, 0))
    port = int(raw_sock.getsockname()[1])
    release = threading.Event()

    def slow(conn: socket.socket) -> None:
        with conn:
            recv_head(conn)
            release.wait(10)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")

    serve_each(raw_sock, slow)
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("fast-http-drain"),
        allowlist=f"allow:\n  - host: raw.test\n    ports: [{port}]\n",
        hosts={"raw.test": RAW},
        args=["--allow-private-range", "127.0.0.0/8", "--drain-timeout", "10"],
    )
    try:
        with socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=10) as s:
            s.sendall(f"GET http://raw.test:{port}/d HTTP/1.1\r\nHost: raw.test\r\n\r\n".encode())
            time.sleep(0.3)
            sidecar.proc.send_signal(15)
            time.sleep(0.3)
            release.set()
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert b"\r\nconnection: close\r\n" in answer.lower() and answer.endswith(b"slow")
    finally:
        release.set()
        sidecar.stop()
        raw_sock.close()


BIG = 32 << 20


def _big_peer(conn: socket.socket) -> None:
    """GET: BIG bytes with a Content-Length; POST: reads the body (slowly), answers its size."""
    with conn, contextlib.suppress(OSError):
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        if head.startswith(b"GET"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
            block = b"x" * (1 << 20)
            for _ in range(BIG >> 20):
                conn.sendall(block)
            return
        got = len(rest)
        chunked = b"chunked" in head.lower()
        while (got < BIG) if not chunked else not rest.endswith(b"0\r\n\r\n"):
            data = conn.recv(1 << 16)
            if not data:
                break
            got += len(data)
            rest = rest[-16:] + data
            time.sleep(0.0002)  # slower than the client: the proxy must hold the client back
        answer = str(got).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer))


def test_big_bodies_stream_both_ways_without_buffering(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sock = socket.create_server((RAW, 0))
    port = int(sock.getsockname()[1])
    serve_each(sock, _big_peer)
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("fast-http-big"),
        allowlist=f"allow:\n  - host: big.test\n    ports: [{port}]\n",
        hosts={"big.test": RAW},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    pid = sidecar.proc.pid
    peak = [rss_bytes(pid)]
    before = peak[0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_bytes(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    url = f"http://big.test:{port}/big"
    curl = ["curl", "-sS", "--max-time", "60", "-x", sidecar.proxy_url]
    try:
        down = subprocess.run(
            [*curl, "--limit-rate", "40M", "-o", "/dev/null", "-w", "%{size_download}", url],
            capture_output=True, text=True, timeout=90, check=True,
        )  # fmt: skip
        assert down.stdout == str(BIG)
        for framing in (f"Content-Length: {BIG}", "Transfer-Encoding: chunked"):
            post = " ".join([*curl, "-X", "POST", "-H", f"'{framing}'", "--data-binary", "@-", url])
            up = subprocess.run(
                ["sh", "-c", f"head -c {BIG} /dev/zero | {post}"],
                capture_output=True, text=True, timeout=90, check=True,
            )  # fmt: skip
            assert int(up.stdout) >= BIG, (framing, up.stdout, up.stderr)
    finally:
        done.set()
        watcher.join()
        assert sidecar.stop() == 0, sidecar.stderr[-20:]
        sock.close()
    # 32 MiB each way (curl's 100-continue uploads included) never held in the proxy.
    assert peak[0] - before < 12 << 20, (before >> 20, peak[0] >> 20)
    assert not [line for line in sidecar.stderr if "loaded mitmproxy" in line]


def test_a_pooled_connection_the_upstream_closed_is_not_reused(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The upstream answers keep-alive, then closes its side while idle (as servers do at
    their keep-alive timeout): the next request goes on a fresh connection, nothing fails."""
    sock = socket.create_server((RAW, 0))
    port = int(sock.getsockname()[1])
    accepted = [0]

    def count(_: socket.socket) -> None:
        accepted[0] += 1

    def answer_then_close(conn: socket.socket) -> None:
        with conn:
            recv_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            time.sleep(0.1)  # idle, then the server's keep-alive timeout

    serve_each(sock, answer_then_close, on_accept=count)
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("fast-http-stale"),
        allowlist=f"allow:\n  - host: raw.test\n    ports: [{port}]\n",
        hosts={"raw.test": RAW},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    try:
        for _ in range(3):
            with requests.Session() as session:
                session.proxies = {"http": sidecar.proxy_url}
                r = session.get(f"http://raw.test:{port}/s", timeout=5)
                assert (r.status_code, r.text) == (200, "ok")
            time.sleep(0.4)
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]
        sock.close()
    assert accepted[0] == 3
