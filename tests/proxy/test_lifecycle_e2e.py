"""The sidecar process's life: restart in place, probe bursts, the open-file limit, the drain."""

from __future__ import annotations

import concurrent.futures
import json
import re
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.proxy.lifecycle_support import Ports, launch, listen_backlog, time_wait_ports
from tests.support.sidecar import Sidecar
from tests.support.sockets import HEAD_END, recv_head
from tests.support.upstream import UpstreamServer

DENY_ALL = "allow: []\n"
CLOSE = b"Host: nowhere.test\r\nConnection: close\r\n\r\n"


def _exchange(port: int, request: bytes) -> socket.socket:
    """A connection that carried one request and its whole response (the server closes it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    # Read to the end: a socket closed with unread data sends RST, which leaves no TIME_WAIT.
    while sock.recv(65536):
        pass
    return sock


def _use_every_listener(sidecar: Sidecar) -> list[socket.socket]:
    """Connections to every listener, so that stopping the sidecar leaves TIME_WAIT behind."""
    held = []
    for _ in range(3):
        held.append(_exchange(sidecar.health_port, b"GET /healthz/live HTTP/1.1\r\n" + CLOSE))
        held.append(
            _exchange(sidecar.explicit_port, b"GET http://nowhere.test/ HTTP/1.1\r\n" + CLOSE)
        )
        # Straight to the transparent port (no redirect): the sidecar finds no original
        # destination and closes it, first, as it does with every such connection.
        held.append(_exchange(sidecar.transparent_port, b""))
    return held


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restarted_sidecar_binds_every_listener_again_at_once(
    tmp_path: Path, how: signal.Signals
) -> None:
    ports = Ports.free()
    first = launch(tmp_path / "first", ports, allowlist=DENY_ALL)
    held = _use_every_listener(first)
    first.proc.send_signal(how)
    first.proc.wait(30)
    for sock in held:
        sock.close()
    # The old run's side of those connections is in TIME_WAIT on each listening port.
    deadline = time.monotonic() + 5
    while not {ports.health, ports.explicit, ports.transparent} <= time_wait_ports():
        assert time.monotonic() < deadline, f"no TIME_WAIT on {ports}: {time_wait_ports()}"
        time.sleep(0.05)
    second = launch(tmp_path / "second", ports, allowlist=DENY_ALL, wait=False)
    try:
        second.wait_ready(timeout=15)
        assert second.health("/healthz/live")[0] == 200
        with socket.create_connection(("127.0.0.1", ports.explicit), timeout=5) as sock:
            sock.sendall(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 403")
    finally:
        assert second.stop() == 0, second.stderr[-10:]


def test_the_health_port_takes_a_burst_of_500_probes(tmp_path: Path) -> None:
    sidecar = launch(tmp_path, Ports.free(), allowlist=DENY_ALL)
    try:
        # A real listen backlog (not socketserver's 5): a burst waits in the queue, not in SYN
        # retransmits (1 s, then 3 s: longer than kubelet's probe timeout).
        assert listen_backlog(sidecar.health_port) >= 1024
        # And the proxy's listeners (asyncio's default was 100).
        assert listen_backlog(sidecar.explicit_port) >= 1024
        assert listen_backlog(sidecar.transparent_port) >= 1024

        def probe(_: int) -> float:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", sidecar.health_port), timeout=10) as s:
                s.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
            return time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(max_workers=500) as pool:
            took = sorted(pool.map(probe, range(500)))
        assert len(took) == 500
        # SYN retransmits after a dropped connect take 1 s and more: none happened.
        assert took[int(len(took) * 0.95)] < 1.0, took[-20:]
    finally:
        assert sidecar.stop() == 0


def _nofile(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:  # in the child, before exec: as a container runtime would set it
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def _start_line(sidecar: Sidecar) -> dict[str, Any]:
    for line in list(sidecar.stderr):
        if line.startswith("{") and json.loads(line).get("msg") == "starting":
            return dict(json.loads(line))
    raise AssertionError(f"no start line: {sidecar.stderr[-10:]}")


def _get(sock: socket.socket, host: str) -> bytes:
    """One keep-alive GET through the explicit proxy on ``sock``; the response head."""
    sock.sendall(f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = recv_head(sock)
    assert HEAD_END in data, data
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    sidecar = launch(tmp_path, Ports.free(), allowlist=DENY_ALL, preexec_fn=_nofile(128, 4096))
    try:
        start = _start_line(sidecar)
        assert (start["open_files_limit"], start["open_files_raised_from"]) == (4096, 128)
        assert start["connection_limit"] > 1000
        with open(f"/proc/{sidecar.proc.pid}/limits") as limits:
            line = next(x for x in limits if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"]
    finally:
        assert sidecar.stop() == 0


def test_at_the_open_file_limit_open_connections_and_probes_keep_working(tmp_path: Path) -> None:
    web = UpstreamServer("127.0.0.7", label="web").start()
    sidecar = launch(
        tmp_path,
        Ports.free(),
        allowlist=f"allow:\n  - host: web.test\n    ports: [{web.port}]\n",
        hosts={"web.test": "127.0.0.7"},
        args=["--allow-private-range", "127.0.0.0/8"],
        preexec_fn=_nofile(160, 160),  # no room to raise it
    )
    held: list[socket.socket] = []
    try:
        start = _start_line(sidecar)
        assert "open_files_raised_from" not in start
        limit = int(start.get("connection_limit", 40))
        assert 8 <= limit < 80
        first = socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=5)
        held.append(first)
        assert _get(first, f"web.test:{web.port}").startswith(b"HTTP/1.1 200")

        # 200 more: more than the process has descriptors for. The first ones are served, the
        # next wait in the listen queue (100), the rest are not even answered (SYN dropped).
        def connect(_: int) -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=1.5)
            except OSError:
                return None

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            flood = [s for s in pool.map(connect, range(200)) if s is not None]
        held += flood
        assert len(flood) >= limit
        time.sleep(1.5)
        # The connection open before the flood still works, and so do the probes.
        assert _get(first, f"web.test:{web.port}").startswith(b"HTTP/1.1 200")
        assert sidecar.health("/healthz/live")[0] == 200
        assert sidecar.health("/healthz/ready")[0] == 200
        # Closing connections lets the waiting ones in: the last one connected gets served.
        last = flood[-1]
        for sock in flood[:-1]:
            sock.close()
        last.settimeout(10)
        assert _get(last, f"web.test:{web.port}").startswith(b"HTTP/1.1 200")
        lines = list(sidecar.stderr)
        emfile = [x for x in lines if "Too many open files" in x or "out of system" in x]
        assert emfile == [], emfile[:3]
        at_limit = [x for x in lines if "connection limit" in x]
        assert 1 <= len(at_limit) <= 2, at_limit  # one line per 10 s interval, not per accept
    finally:
        for sock in held:
            sock.close()
        code = sidecar.stop()
        web.stop()
    assert code == 0, sidecar.stderr[-5:]
