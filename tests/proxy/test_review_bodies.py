"""Review of issue 8 item 3 past the head: a chunked request body's own lines.

The head was bounded, but h11 (which mitmproxy reads bodies with) buffers a chunk-size line
(with its extensions) and a trailer section without bound: 48 MB sent grew the sidecar's RSS by
48 MB each. And a request with trailer fields crashed its connection handler ("HTTP trailers are
not implemented yet"): the client waited for an answer that never came. Now a chunk line is
bounded like a header line and a trailer section like a head (the connection is closed), and
trailer fields are dropped (RFC 9110 6.5.1), the request served.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.proxy.test_tunnels_e2e import Recorder
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer

WEB, SINK, TRAILING = "127.0.0.24", "127.0.0.25", "127.0.0.26"
CHUNKED_BODY_END = b"\r\n0\r\n\r\n"
SENT_CAP = 2**20  # 64 times the bound: the proxy must have given up long before


@dataclass
class World:
    sidecar: Sidecar
    web: UpstreamServer
    sink: Recorder  # reads whatever comes, never answers
    trailing_port: int  # answers every request with a chunked body and trailer fields
    trailing_bodies: list[bytes]  # the request bodies it received


def _serve_trailers(server: socket.socket, bodies: list[bytes]) -> None:
    """Reads a request through its chunked body's end, then answers with trailer fields."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            received = b""
            with contextlib.suppress(OSError):
                while not (b"\r\n\r\n" in received and received.endswith(CHUNKED_BODY_END)):
                    if b"GET " in received[:4] and received.endswith(b"\r\n\r\n"):
                        break
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            bodies.append(received.split(b"\r\n\r\n", 1)[-1])
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
                b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
            )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    web = UpstreamServer(WEB).start()
    sink = Recorder(SINK).start()
    trailing = socket.create_server((TRAILING, 0))
    trailing_port = int(trailing.getsockname()[1])
    bodies: list[bytes] = []
    threading.Thread(target=_serve_trailers, args=(trailing, bodies), daemon=True).start()
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("review-bodies"),
        allowlist=(
            f"allow:\n  - host: web.test\n    ports: [{web.server_port}]\n"
            f"  - host: sink.test\n    ports: [{sink.port}]\n"
            f"  - host: trailing.test\n    ports: [{trailing_port}]\n"
        ),
        hosts={"web.test": WEB, "sink.test": SINK, "trailing.test": TRAILING},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    yield World(sidecar, web, sink, trailing_port, bodies)
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    web.stop()
    sink.stop()
    trailing.close()


def _head(authority: str) -> bytes:
    return (
        f"POST http://{authority}/chunked HTTP/1.1\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()


def test_trailer_fields_are_dropped_and_the_request_served(world: World) -> None:
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=5) as s:
        s.sendall(
            _head(f"trailing.test:{world.trailing_port}")
            + b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\n"
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert world.trailing_bodies[-1] == b"5\r\nhello" + CHUNKED_BODY_END  # no trailer went up


def test_an_upstreams_trailer_fields_are_dropped_and_the_body_delivered(world: World) -> None:
    """curl reads the whole body (it used to get a cut one: the connection handler crashed)."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "-x", world.sidecar.proxy_url,
         f"http://trailing.test:{world.trailing_port}/"],
        capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello"


@pytest.mark.parametrize(
    "opening",
    [b"5;ext=", b"0\r\nX-Trailer: "],
    ids=["chunk-extension-without-end", "trailer-without-end"],
)
def test_a_chunk_line_or_trailer_that_never_ends_is_cut(world: World, opening: bytes) -> None:
    """Sent at a pace the proxy keeps up with: it must cut the connection (a reset or a broken
    pipe) long before the cap, where it used to read and buffer all of it."""
    sent, error = 0, None
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=5) as s:
        s.sendall(_head(f"sink.test:{world.sink.port}") + opening)
        block = b"a" * 16384
        deadline = time.monotonic() + 15
        try:
            while sent < SENT_CAP and time.monotonic() < deadline:
                s.sendall(block)
                sent += len(block)
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError) as err:
            error = err
    assert error is not None and sent < SENT_CAP, sent


def test_no_connection_handler_crashed(world: World) -> None:
    time.sleep(0.2)
    text = "\n".join(world.sidecar.stderr)
    assert "has crashed" not in text, text[-3000:]
