"""CONNECT tunnels end to end: answered only once the upstream is up (502/504 otherwise), and the
tunnel's first flight peeked (never decrypted): a ClientHello naming another host than the
CONNECT is refused before any of its bytes reach the upstream (domain fronting).

Real clients (curl, openssl s_client, Python ssl), real upstreams: an HTTPS server with its own
certificate, and a raw TCP recorder that logs every byte it receives (so "nothing reached the
upstream" is checked on the upstream itself), which can also greet first like SMTP.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.otlp import STATUS_ERROR, OtlpHttpReceiver, ReceivedSpan
from tests.support.sidecar import Sidecar, free_port, start_sidecar
from tests.support.sockets import serve_each
from tests.support.tls import TestCA
from tests.support.upstream import UpstreamServer

API, REC, BLACKHOLE, CLOSED, BANNER = (
    "127.0.0.12",
    "127.0.0.13",
    "127.0.0.14",
    "127.0.0.15",
    "127.0.0.16",
)
CLOSED_PORT = free_port(CLOSED)  # nothing listens there


@dataclass
class Conn:
    received: bytes = b""
    closed: bool = False


@dataclass
class Recorder:
    """A raw TCP upstream: records what each connection sends; may greet first, may echo."""

    host: str
    banner: bytes = b""
    echo: bool = False
    conns: list[Conn] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Recorder:
        self.sock = socket.create_server((self.host, 0))
        self.port = int(self.sock.getsockname()[1])
        self._records: dict[socket.socket, Conn] = {}
        serve_each(self.sock, self._serve, on_accept=self._record)
        return self

    def _record(self, conn: socket.socket) -> None:
        # On accept, not when served: a test reads conns[mark] right after its CONNECT's 200.
        with self.lock:
            self.conns.append(record := Conn())
            self._records[conn] = record

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            record = self._records.pop(conn)
        conn.settimeout(10)
        with conn:
            try:
                if self.banner:
                    conn.sendall(self.banner)
                for _ in range(1000):
                    data = conn.recv(65536)
                    if not data:
                        break
                    with self.lock:
                        record.received += data
                    if self.echo:
                        conn.sendall(data)
            except OSError:
                pass
        with self.lock:
            record.closed = True

    def mark(self) -> int:
        with self.lock:
            return len(self.conns)

    def wait_received(self, mark: int, expected: bytes, timeout: float = 5.0) -> bytes:
        """What the first connection accepted since ``mark`` received, once it is ``expected``
        or after ``timeout``. The kernel completes the handshake (and the sidecar answers its
        200) before this server's accept thread has registered the connection: it may not be
        in ``conns`` yet when a test starts looking."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                received = self.conns[mark].received if len(self.conns) > mark else None
            if received == expected or time.monotonic() > deadline:
                return received if received is not None else b"<no connection>"
            time.sleep(0.02)

    def closed_since(self, mark: int, timeout: float = 5.0) -> list[Conn]:
        """The connections accepted since ``mark``, once each of them has closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                new = self.conns[mark:]
                if new and all(c.closed for c in new):
                    return list(new)
            time.sleep(0.02)
        with self.lock:
            return list(self.conns[mark:])

    def stop(self) -> None:
        self.sock.close()


@dataclass
class World:
    sidecar: Sidecar
    api: UpstreamServer
    api_fingerprint: str
    rec: Recorder
    banner: Recorder
    blackhole_port: int
    otlp: OtlpHttpReceiver
    ca_file: Path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    test_ca: TestCA,
    ca_file: Path,
    otlp_http: OtlpHttpReceiver,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("tunnels")
    api_cert = test_ca.issue("api.test", "xn--bcher-kva.test")
    api = UpstreamServer(API, label="api", tls=api_cert.write(tmp, "api")).start()
    rec = Recorder(REC).start()
    banner = Recorder(BANNER, banner=b"220 banner.test ESMTP\r\n", echo=True).start()
    # A listener whose accept queue is full: SYNs to it are dropped, a connect never completes.
    blackhole = socket.create_server((BLACKHOLE, 0), backlog=0)
    blackhole_port = int(blackhole.getsockname()[1])
    filler = socket.create_connection((BLACKHOLE, blackhole_port), timeout=2)
    allowlist = f"""
allow:
  - host: api.test
    ports: [{api.port}]
  - host: bücher.test
    ports: [{api.port}]
  - host: rec.test
    ports: [{rec.port}]
  - host: banner.test
    ports: [{banner.port}]
  - host: closed.test
    ports: [{CLOSED_PORT}]
  - host: blackhole.test
    ports: [{blackhole_port}]
  - cidr: {API}/32
    ports: [{api.port}]
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={
            "api.test": API,
            "xn--bcher-kva.test": API,
            "rec.test": REC,
            "banner.test": BANNER,
            "closed.test": CLOSED,
            "blackhole.test": BLACKHOLE,
        },
        args=["--allow-private-range", "127.0.0.0/8", "--connect-timeout", "1"],
        env=otlp_http.exporter_env,
    )
    yield World(
        sidecar, api, api_cert.fingerprint_sha256, rec, banner, blackhole_port, otlp_http, ca_file
    )
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    api.stop()
    rec.stop()
    banner.stop()
    filler.close()
    blackhole.close()


def client_hello(sni: str | None) -> bytes:
    """A real ClientHello, as Python's ssl (OpenSSL) writes it for ``sni``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def connect_spans(
    world: World, host: str, count: int = 1, reason: str | None = None
) -> list[ReceivedSpan]:
    return world.otlp.sink.wait_for(
        lambda s: (
            s.name == "CONNECT"
            and s.attributes.get("server.address") == host
            and reason in (None, s.attributes.get("egress.reason"))
        ),
        count,
    )


# -- item 15: CONNECT answered once the upstream is up -----------------------------------------


@pytest.mark.parametrize(
    ("host", "status", "reason", "error_type"),
    [
        ("closed.test", 502, "upstream connection refused", "connection_refused"),
        ("blackhole.test", 504, "upstream timeout", "timeout"),
    ],
)
def test_a_connect_to_an_unreachable_upstream_is_answered_5xx_never_200(
    world: World, host: str, status: int, reason: str, error_type: str
) -> None:
    port = CLOSED_PORT if host == "closed.test" else world.blackhole_port
    before = len(connect_spans(world, host, 0, reason="matched allow rule"))
    started = time.monotonic()
    sock, head = world.sidecar.connect_tunnel(f"{host}:{port}")
    elapsed = time.monotonic() - started
    sock.close()
    text = head.decode()
    assert text.startswith(f"HTTP/1.1 {status} "), text
    assert "x-egress-decision: allow" in text
    assert f"x-egress-reason: {reason}" in text
    assert elapsed < 5, elapsed  # --connect-timeout 1, not the kernel's SYN retries (~2 min)
    curl = subprocess.run(
        ["curl", "-s", "-x", world.sidecar.proxy_url, f"https://{host}:{port}/",
         "-o", "/dev/null", "-w", "%{http_connect}", "--max-time", "10"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert curl.stdout == str(status), curl
    span = connect_spans(world, host, before + 2, reason="matched allow rule")[-1]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["egress.decision"] == "allow"
    assert span.attributes["error.type"] == error_type
    assert span.attributes["http.response.status_code"] == status


def test_the_502_body_is_one_line_naming_target_reason_and_policy(world: World) -> None:
    sock, head = world.sidecar.connect_tunnel(f"closed.test:{CLOSED_PORT}")
    rest = read_until_closed(sock, 2)
    sock.close()
    body = (head + rest).split(b"\r\n\r\n", 1)[1].decode()
    assert body.count("\n") == 1 and body.endswith("\n"), body
    assert f"closed.test:{CLOSED_PORT}" in body and "upstream connection refused" in body
    assert "policy file:" in body


def test_an_allowed_connect_is_answered_200_after_the_upstream_accepted(world: World) -> None:
    mark = world.rec.mark()
    sock, head = world.sidecar.connect_tunnel(f"rec.test:{world.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    # Connected before the answer: the upstream has the connection though nothing was sent
    # (its accept() may return a moment after the kernel completed the handshake).
    deadline = time.monotonic() + 2
    while world.rec.mark() == mark and time.monotonic() < deadline:
        time.sleep(0.01)
    assert world.rec.mark() == mark + 1
    sock.close()


def test_a_server_that_speaks_first_is_heard_through_a_tunnel(world: World) -> None:
    sock, head = world.sidecar.connect_tunnel(f"banner.test:{world.banner.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.settimeout(5)
    greeting = head.split(b"\r\n\r\n", 1)[1] or sock.recv(1024)
    assert greeting == b"220 banner.test ESMTP\r\n"  # before the client sent anything
    sock.sendall(b"EHLO client\r\n")
    assert sock.recv(1024) == b"EHLO client\r\n"
    sock.close()
    span = connect_spans(world, "banner.test")[-1]
    assert span.attributes["egress.decision"] == "allow"


# -- item 6: the tunnel's ClientHello must name the CONNECT host -------------------------------


@pytest.mark.parametrize(
    ("sni", "relayed"),
    [
        ("rec.test", True),
        ("REC.test", True),  # case
        ("rec.test.", True),  # trailing dot
        (None, True),  # no SNI: the CONNECT host decided
        ("api.test", False),  # another allowed host: fronting all the same
        ("evil.example", False),
    ],
)
def test_a_tunnels_clienthello_must_name_the_connect_host(
    world: World, sni: str | None, relayed: bool
) -> None:
    hello = client_hello(sni)
    mark = world.rec.mark()
    sock, head = world.sidecar.connect_tunnel(f"rec.test:{world.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    for i in range(0, len(hello), 100):  # in pieces: the whole ClientHello is awaited
        sock.sendall(hello[i : i + 100])
        time.sleep(0.01)
    if relayed:
        try:
            assert world.rec.wait_received(mark, hello) == hello
        finally:
            sock.close()
        return
    assert read_until_closed(sock) == b""  # closed by the proxy
    sock.close()
    (conn,) = world.rec.closed_since(mark)
    assert conn.closed and conn.received == b""  # not one byte of the ClientHello went up
    span = connect_spans(world, "rec.test", reason="sni mismatch")[-1]
    assert span.attributes["egress.decision"] == "deny"
    assert span.attributes["error.type"] == "egress_denied"
    assert span.status_code == STATUS_ERROR
    line = world.sidecar.wait_decisions(
        lambda d: d.get("host") == "rec.test" and d["decision"] == "deny"
    )[-1]
    assert line["reason"] == "sni mismatch"


def _tls_through(world: World, authority: str, sni: str | None) -> str:
    """A real TLS handshake through a tunnel; the upstream certificate's fingerprint."""
    sock, head = world.sidecar.connect_tunnel(authority)
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(world.ca_file))
    context.check_hostname = False  # the fingerprint is compared instead (IDN, IP literals)
    with context.wrap_socket(sock, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def test_an_idn_connect_host_in_other_case_matches_its_sni(world: World) -> None:
    # The allowlist spells it bücher.test; on the wire both are punycode, in any case.
    authority = f"XN--Bcher-KVA.Test.:{world.api.port}"
    assert _tls_through(world, authority, "xn--bcher-kva.test") == world.api_fingerprint


def test_a_connect_to_an_ip_literal_passes_without_sni_and_refuses_a_named_one(
    world: World,
) -> None:
    """Strict: a CONNECT to an address decided by a cidr rule; an SNI naming a host was never
    decided, so it is refused (sni mismatch) rather than trusted."""
    authority = f"{API}:{world.api.port}"
    assert _tls_through(world, authority, None) == world.api_fingerprint
    with pytest.raises((ssl.SSLError, OSError)):
        _tls_through(world, authority, "api.test")
    span = connect_spans(world, API, reason="sni mismatch")[-1]
    assert span.attributes["egress.decision"] == "deny"


def test_openssl_with_another_servername_through_the_proxy_is_refused(world: World) -> None:
    proxy = f"127.0.0.1:{world.sidecar.explicit_port}"
    argv = ["openssl", "s_client", "-proxy", proxy, "-connect", f"api.test:{world.api.port}",
            "-CAfile", str(world.ca_file), "-verify_return_error"]  # fmt: skip
    ok = subprocess.run(
        [*argv, "-servername", "api.test"],
        input="", capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in ok.stdout, ok.stdout + ok.stderr
    fronted = subprocess.run(
        [*argv, "-servername", "evil.example"],
        input="", capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert "no peer certificate available" in fronted.stdout, fronted.stdout
    assert "BEGIN CERTIFICATE" not in fronted.stdout
    span = connect_spans(world, "api.test", reason="sni mismatch")[-1]
    assert span.attributes["egress.decision"] == "deny"


def test_no_connection_handler_crashed(world: World) -> None:
    """Last in this module: none of the above left a traceback in the sidecar's output."""
    text = "\n".join(world.sidecar.stdout + world.sidecar.stderr)
    assert "Traceback" not in text and "has crashed" not in text, text[-3000:]
