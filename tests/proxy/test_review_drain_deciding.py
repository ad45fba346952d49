"""Review of issue 8 item 14: SIGTERM while a request is still being decided.

A request whose head has arrived is in flight even while its host name is being resolved: the
drain must let it finish (up to the drain timeout), not cut it as an idle connection. A real
name server on loopback answers after a delay (as a slow cluster DNS does); SIGTERM arrives
during the lookup; the plain-HTTP GET and the CONNECT are both still answered, and the sidecar
exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from bench.hosts import hosts_file
from tests.support import sidecar as harness
from tests.support.upstream import UpstreamServer

DNS_HOST = "127.77.0.53"  # the sidecar's resolv.conf names this server (inside its namespace)
DNS_DELAY = 1.0
UPSTREAM = "127.0.0.1"


class SlowDns:
    """Answers A queries for every name with 127.0.0.1, DNS_DELAY seconds late."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((DNS_HOST, 53))
        self.sock.settimeout(0.2)
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.queries += 1
            threading.Timer(DNS_DELAY, self._answer, (query, peer)).start()

    def _answer(self, query: bytes, peer: tuple[str, int]) -> None:
        pos = 12
        while query[pos]:
            pos += 1 + query[pos]
        qtype = struct.unpack_from("!H", query, pos + 1)[0]
        end = pos + 5
        answers = 1 if qtype == 1 else 0
        reply = query[:2] + struct.pack("!HHHHH", 0x8180, 1, answers, 0, 0) + query[12:end]
        if answers:
            reply += struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(UPSTREAM)
        if not self._stop.is_set():
            with contextlib.suppress(OSError):  # closed by stop() meanwhile
                self.sock.sendto(reply, peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)  # recvfrom wakes within its 0.2 s timeout, then the loop ends
        self.sock.close()


@pytest.fixture(scope="module")
def dns() -> Iterator[SlowDns]:
    server = SlowDns()
    yield server
    server.stop()


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer(UPSTREAM, label="up").start()
    yield server
    server.stop()


@pytest.fixture
def sidecar(
    tmp_path: Path, dns: SlowDns, upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[harness.Sidecar]:
    original = hosts_file  # what the harness writes, before the patch below

    def with_dns(path: Path, names: object, extra: object = ()) -> Path:
        written = original(path, {}, ())
        # Names not in the hosts file go to the slow name server (loopback only).
        (path.parent / "nsswitch.conf").write_text("hosts: files dns\n")
        (path.parent / "resolv.conf").write_text(
            f"nameserver {DNS_HOST}\noptions timeout:5 attempts:1\n"
        )
        return written

    monkeypatch.setattr(harness, "hosts_file", with_dns)
    car = harness.start_sidecar(
        tmp_path,
        allowlist=f"allow:\n  - host: '*.slow.test'\n    ports: [{upstream.port}]\n",
        args=["--allow-private-range", "127.0.0.0/8", "--drain-timeout", "10"],
    )
    yield car
    car.stop()


def _get(car: harness.Sidecar, url: str, out: dict[str, object]) -> None:
    try:
        proxies = {"http": car.proxy_url}
        out["status"] = requests.get(url, proxies=proxies, timeout=15).status_code
    except requests.RequestException as exc:
        out["error"] = repr(exc)


def _connect(car: harness.Sidecar, authority: str, out: dict[str, object]) -> None:
    try:
        sock, head = car.connect_tunnel(authority)
        out["head"] = head.split(b"\r\n", 1)[0].decode()
        if head.startswith(b"HTTP/1.1 200"):
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()
            )
            out["tunnelled"] = sock.recv(64).split(b"\r\n", 1)[0].decode()
        sock.close()
    except OSError as exc:
        out["error"] = repr(exc)


CLIENTS: dict[str, Callable[[harness.Sidecar, int, dict[str, object]], None]] = {
    "plain-http": lambda car, port, out: _get(car, f"http://a.slow.test:{port}/x", out),
    "connect": lambda car, port, out: _connect(car, f"b.slow.test:{port}", out),
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_sigterm_during_the_name_lookup_lets_the_request_finish(
    client: str, sidecar: harness.Sidecar, dns: SlowDns, upstream: UpstreamServer
) -> None:
    out: dict[str, object] = {}
    asked = dns.queries
    thread = threading.Thread(target=CLIENTS[client], args=(sidecar, upstream.port, out))
    thread.start()
    deadline = time.monotonic() + 5
    while dns.queries == asked:  # the head arrived, the decision waits on the name server
        assert time.monotonic() < deadline, sidecar.stderr[-10:]
        time.sleep(0.01)
    time.sleep(0.1)
    sidecar.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert sidecar.proc.wait(20) == 0, sidecar.stderr[-10:]
    if client == "plain-http":
        assert out == {"status": 200}, (out, sidecar.stderr[-10:])
    else:
        assert str(out.get("head")).startswith("HTTP/1.1 200"), (out, sidecar.stderr[-10:])
        assert str(out.get("tunnelled")).endswith(" 200 OK"), (out, sidecar.stderr[-10:])
