"""The sidecar process's life: restart in place, probe bursts, the open-file limit, the drain."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.proxy.lifecycle_support import Ports, launch, listen_backlog, time_wait_ports
from tests.support.sidecar import Sidecar

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
