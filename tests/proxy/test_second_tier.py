"""mitmproxy is the second tier: never loaded by ordinary calls, loaded on the first connection
that needs it (an Upgrade), which it then serves whole, decided like any other call.

"Loaded" is read from the sidecar process itself: mitmproxy's native module (mitmproxy_rs) is
mapped into it only once mitmproxy is imported, and the sidecar logs the load with its reason.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.sockets import recv_head, serve_each
from tests.support.upstream import UpstreamServer

WS = "127.0.0.31"
PLAIN = "127.0.0.32"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _frame(payload: bytes, *, masked: bool) -> bytes:
    """One final text frame (RFC 6455 5.2), short payloads only."""
    assert len(payload) < 126
    if not masked:
        return bytes([0x81, len(payload)]) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + key + body


def _read_frame(sock: socket.socket) -> bytes:
    head = _recv_exactly(sock, 2)
    length = head[1] & 0x7F
    assert length < 126
    key = _recv_exactly(sock, 4) if head[1] & 0x80 else b""
    body = _recv_exactly(sock, length)
    return bytes(b ^ key[i % 4] for i, b in enumerate(body)) if key else body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


class EchoWebSocket:
    """A WebSocket upstream: answers the upgrade, then echoes each text frame."""

    def __init__(self) -> None:
        self.sock = socket.create_server((WS, 0))
        self.port = int(self.sock.getsockname()[1])
        serve_each(self.sock, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = recv_head(conn)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            try:
                while True:
                    conn.sendall(_frame(b"echo:" + _read_frame(conn), masked=False))
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstreams() -> Iterator[tuple[EchoWebSocket, UpstreamServer]]:
    ws = EchoWebSocket()
    plain = UpstreamServer(PLAIN).start()
    yield ws, plain
    ws.close()
    plain.stop()


def _mitmproxy_loaded(sidecar: Sidecar) -> bool:
    maps = Path(f"/proc/{sidecar.proc.pid}/maps").read_text()
    return "mitmproxy_rs" in maps


def _decisions(sidecar: Sidecar, count: int) -> list[dict[str, Any]]:
    return sidecar.wait_decisions(lambda d: d.get("msg") == "egress decision", count)


def _start(tmp_path: Path, ws: EchoWebSocket, plain: UpstreamServer, *args: str) -> Sidecar:
    allowlist = f"""
allow:
  - host: ws.test
    ports: [{ws.port}]
  - host: plain.test
    ports: [{plain.port}]
"""
    return start_sidecar(
        tmp_path,
        allowlist=allowlist,
        hosts={"ws.test": WS, "plain.test": PLAIN},
        args=["--allow-private-range", "127.0.0.0/8", *args],
    )


def _plain_get(sidecar: Sidecar, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=10) as s:
        s.sendall(
            f"GET http://plain.test:{port}/x HTTP/1.1\r\nHost: plain.test:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        return recv_head(s)


def _websocket(sidecar: Sidecar, port: int) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=10) as s:
        key = base64.b64encode(os.urandom(16))
        s.sendall(
            f"GET http://ws.test:{port}/chat HTTP/1.1\r\nHost: ws.test:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n\r\n".encode()
        )
        head = recv_head(s)
        s.sendall(_frame(b"hello", masked=True))
        return head, _read_frame(s)


def test_ordinary_calls_never_load_mitmproxy_an_upgrade_does(
    tmp_path: Path, upstreams: tuple[EchoWebSocket, UpstreamServer]
) -> None:
    ws, plain = upstreams
    sidecar = _start(tmp_path, ws, plain)
    try:
        assert not _mitmproxy_loaded(sidecar), "mitmproxy loaded at idle"
        assert _plain_get(sidecar, plain.port).startswith(b"HTTP/1.1 200")
        tunnel, head = sidecar.connect_tunnel(f"plain.test:{plain.port}")
        tunnel.close()
        assert head.startswith(b"HTTP/1.1 200")
        _decisions(sidecar, 2)
        assert not _mitmproxy_loaded(sidecar), "an ordinary call loaded mitmproxy"
        assert not any("loaded mitmproxy" in line for line in sidecar.stdout + sidecar.stderr)

        head, echoed = _websocket(sidecar, ws.port)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert echoed == b"echo:hello"
        assert _mitmproxy_loaded(sidecar)
        [upgrade] = [d for d in _decisions(sidecar, 3) if d.get("host") == "ws.test"]
        assert upgrade["decision"] == "allow"
        assert upgrade["status"] == 101
        loads = [line for line in sidecar.stdout + sidecar.stderr if "loaded mitmproxy" in line]
        assert len(loads) == 1 and "Upgrade" in loads[0], loads
        # The second tier stays loaded and serves the next one without loading again.
        head, echoed = _websocket(sidecar, ws.port)
        assert echoed == b"echo:hello"
        assert len([ln for ln in sidecar.stdout + sidecar.stderr if "loaded mitmproxy" in ln]) == 1
    finally:
        sidecar.stop()


def test_a_denied_upgrade_gets_the_403_and_one_decision(
    tmp_path: Path, upstreams: tuple[EchoWebSocket, UpstreamServer]
) -> None:
    ws, plain = upstreams
    sidecar = _start(tmp_path, ws, plain)
    try:
        with socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=10) as s:
            s.sendall(
                b"GET http://other.test/chat HTTP/1.1\r\nHost: other.test\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            head = recv_head(s)
        assert head.startswith(b"HTTP/1.1 403"), head
        assert b"x-egress-reason: no allow rule matches" in head
        [denied] = _decisions(sidecar, 1)
        assert (denied["decision"], denied["host"]) == ("deny", "other.test")
    finally:
        sidecar.stop()


def test_the_mitmproxy_engine_serves_every_connection(
    tmp_path: Path, upstreams: tuple[EchoWebSocket, UpstreamServer]
) -> None:
    ws, plain = upstreams
    sidecar = _start(tmp_path, ws, plain, "--engine", "mitmproxy")
    try:
        assert _mitmproxy_loaded(sidecar)  # at start: no first call waits for it
        assert _plain_get(sidecar, plain.port).startswith(b"HTTP/1.1 200")
        head, echoed = _websocket(sidecar, ws.port)
        assert head.startswith(b"HTTP/1.1 101") and echoed == b"echo:hello"
    finally:
        sidecar.stop()
