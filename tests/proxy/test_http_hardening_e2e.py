"""Plain HTTP through a running sidecar under attack and failure: oversized and slow request
heads, L7 rules and tunnels, upstreams that fail, clients that leave, fuzzed heads. Real clients
(raw sockets, curl, requests), real upstreams, real OTLP decoded with opentelemetry-proto."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.http_heads import request_heads
from tests.support.otlp import STATUS_ERROR, OtlpHttpReceiver, ReceivedSpan
from tests.support.sidecar import Sidecar, free_port, start_sidecar
from tests.support.sockets import HEAD_END, recv_head, serve_each
from tests.support.upstream import UpstreamServer

WEB, L7, RAW, DENIED = "127.0.0.3", "127.0.0.6", "127.0.0.7", "127.0.0.4"
CLOSED = "127.0.0.5"
CLOSED_PORT = free_port(CLOSED)  # nothing listens there
HEAD_TIMEOUT = 1.0


@dataclass
class RawUpstream:
    """A TCP server that answers each connection with ``behaviour`` (a scripted failure)."""

    host: str
    behaviour: Callable[[socket.socket], None]
    sock: socket.socket = field(init=False)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server((self.host, 0))
        serve_each(self.sock, self._run, on_accept=self._count)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _count(self, conn: socket.socket) -> None:
        self.accepted += 1

    def _run(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if HEAD_END not in recv_head(conn):
                    return
                self.behaviour(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _close_before_answering(conn: socket.socket) -> None:
    pass  # the with-block closes it: the upstream ended the exchange


def _half_a_body_then_close(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    time.sleep(0.2)


def _half_a_body_then_wait(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    conn.recv(1)  # until the proxy gives up on us (the client left)


@dataclass
class World:
    sidecar: Sidecar
    web: UpstreamServer
    l7: UpstreamServer
    denied: UpstreamServer
    gone: RawUpstream
    truncated: RawUpstream
    stalled: RawUpstream
    otlp: OtlpHttpReceiver

    def spans(
        self, predicate: Callable[[ReceivedSpan], bool], count: int = 1
    ) -> list[ReceivedSpan]:
        return self.otlp.sink.wait_for(predicate, count)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, otlp_http: OtlpHttpReceiver) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hardening")
    web = UpstreamServer(WEB, label="web").start()
    l7 = UpstreamServer(L7, label="l7").start()
    denied = UpstreamServer(DENIED, label="denied").start()
    gone = RawUpstream(RAW, _close_before_answering)
    truncated = RawUpstream(RAW, _half_a_body_then_close)
    stalled = RawUpstream(RAW, _half_a_body_then_wait)
    allowlist = f"""
allow:
  - host: web.test
    ports: [{web.port}]
  - host: l7.test
    ports: [{l7.port}]
    methods: [GET]
    paths: ["/ok/*"]
  - host: closed.test
    ports: [{CLOSED_PORT}]
  - host: raw.test
    ports: [{gone.port}, {truncated.port}, {stalled.port}]
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={
            "web.test": WEB,
            "l7.test": L7,
            "closed.test": CLOSED,
            "raw.test": RAW,
            "denied.test": DENIED,
        },
        args=[
            "--allow-private-range",
            "127.0.0.0/8",
            "--request-head-timeout",
            str(HEAD_TIMEOUT),
        ],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    yield World(sidecar, web, l7, denied, gone, truncated, stalled, otlp_http)
    # Checked before stopping: a SIGTERM with a client connection still open logs asyncio's
    # CancelledError (mitmproxy's shutdown, not these tests' subject).
    crashes = [line for line in sidecar.stderr if "Traceback" in line or "crashed" in line]
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    for server in (web, l7, denied):
        server.stop()
    for raw in (gone, truncated, stalled):
        raw.close()
    assert not crashes


def _exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; everything received until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # refused mid-send: the answer is still to be read
            sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


def _head(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """The final response's status, headers and body (interim 1xx responses skipped)."""
    while answer.startswith(b"HTTP/1.1 1"):
        answer = answer.partition(b"\r\n\r\n")[2]
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


# -- item 3: request-head limits -------------------------------------------------------------

WEB_ABS = "http://web.test:{port}"


@pytest.mark.parametrize(
    ("build", "status", "reason", "detail"),
    [
        pytest.param(
            lambda t: f"GET {t}/{'a' * 9000} HTTP/1.1\r\nHost: web.test\r\n\r\n".encode(),
            414,
            "request line too long",
            "request line longer than 8192 bytes",
        ),
        pytest.param(
            lambda t: f"GET {t}/x HTTP/1.1\r\nX-Big: {'v' * 20000}\r\n\r\n".encode(),
            431,
            "request head too large",
            "longer than 16384 bytes",
        ),
        pytest.param(
            lambda t: f"GET {t}/x HTTP/1.1\r\nX-Big: {'v' * (1 << 20)}\r\n\r\n".encode(),
            431,
            "request head too large",
            "longer than 16384 bytes",
        ),
        pytest.param(
            lambda t: f"GET {t}/{'a' * (1 << 20)} HTTP/1.1\r\n\r\n".encode(),
            414,
            "request line too long",
            "request line longer than 8192 bytes",
        ),
        pytest.param(
            lambda t: (
                f"GET {t}/x HTTP/1.1\r\n".encode()
                + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
                + b"\r\n"
            ),
            431,
            "request head too large",
            "more than 100 header fields",
        ),
        pytest.param(
            lambda t: (
                f"GET {t}/x HTTP/1.1\r\n".encode()
                + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
                + b"\r\n"
            ),
            431,
            "request head too large",
            "larger than 65536 bytes",
        ),
        pytest.param(
            lambda t: f"GET {t}/x HTTP/1.1\r\n".encode() + b"X: 1\r\n" * 10_000 + b"\r\n",
            431,
            "request head too large",
            "more than 100 header fields",
        ),
        pytest.param(
            lambda t: (
                f"POST {t}/x HTTP/1.1\r\nContent-Length: 4\r\n".encode()
                + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
            "invalid request",
            "transfer-encoding and content-length",
        ),
    ],
    ids=[
        "request-line",
        "one-header-line",
        "one-mib-header-line",
        "one-mib-request-line",
        "header-count",
        "total-head",
        "10000-headers",
        "smuggling-te-cl",
    ],
)
def test_oversized_heads_are_refused_before_anything_goes_upstream(
    world: World,
    build: Callable[[str], bytes],
    status: int,
    reason: str,
    detail: str,
) -> None:
    before = len(world.web.seen.requests), world.web.seen.connections
    answer = _exchange(world.sidecar.explicit_port, build(WEB_ABS.format(port=world.web.port)))
    got, headers, body = _head(answer)
    assert got == status, answer[:300]
    assert headers["x-egress-decision"] == "deny"
    assert headers["x-egress-reason"] == reason
    assert headers["connection"] == "close"
    assert body.count(b"\n") == 1 and detail in body.decode(), body
    assert (len(world.web.seen.requests), world.web.seen.connections) == before
    span = world.spans(
        lambda s: (
            s.attributes.get("egress.reason") == reason
            and detail in str(s.attributes.get("egress.reason.detail"))
        )
    )[-1]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["http.response.status_code"] == status
    assert span.attributes["egress.decision"] == "deny"
    assert span.attributes["error.type"] == "egress_denied"


def test_a_pipelined_oversized_head_is_refused_after_the_answer_before_it(world: World) -> None:
    """The next head buffered while a response is in flight is bounded too, and refused in turn."""
    before = len(world.web.seen.requests)
    target = f"http://web.test:{world.web.port}"
    answer = _exchange(
        world.sidecar.explicit_port,
        f"GET {target}/first HTTP/1.1\r\nHost: web.test\r\n\r\n".encode()
        + f"GET {target}/second HTTP/1.1\r\nX-Big: {'v' * (1 << 20)}\r\n\r\n".encode(),
    )
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"HTTP/1.1 431" in rest and b"x-egress-reason: request head too large" in rest
    assert [r["path"] for r in world.web.seen.requests[before:]] == ["/first"]


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/1.2"])
@pytest.mark.parametrize(
    "extra",
    ["", "Connection: upgrade\r\nUpgrade: websocket\r\n", "Expect: 100-continue\r\n"],
    ids=["plain", "upgrade", "expect"],
)
def test_a_version_other_than_http_1_0_or_1_1_gets_400_and_nothing_goes_upstream(
    world: World, version: str, extra: str
) -> None:
    """mitmproxy read "HTTP/2.0" in an HTTP/1 request line as an HTTP/2 request: its Host was the
    request-target's authority, so Host alignment left the client's own Host header, and a
    request decided for web.test reached web.test's address naming denied.test. The fast path
    hands such a line to mitmproxy; the HTTP/1 layer there now refuses it."""
    before = len(world.web.seen.requests), world.web.seen.connections
    raw = (
        f"GET {WEB_ABS.format(port=world.web.port)}/v {version}\r\n"
        f"Host: denied.test\r\n{extra}Connection: close\r\n\r\n"
    ).encode()
    status, headers, body = _head(_exchange(world.sidecar.explicit_port, raw))
    assert status == 400
    assert headers["x-egress-decision"] == "deny"
    assert headers["x-egress-reason"] == "invalid request"
    assert f"HTTP version '{version}'" in body.decode(), body
    assert (len(world.web.seen.requests), world.web.seen.connections) == before
    assert world.denied.seen.connections == 0


def test_a_half_mib_header_from_curl_gets_our_431(world: World, tmp_path: Path) -> None:
    header = tmp_path / "header"
    # Too long for an argument: curl -H @file (curl itself refuses a 1 MiB one).
    header.write_text(f"X-Big: {'v' * (1 << 19)}\n")
    before = world.web.seen.connections
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-x",
            world.sidecar.proxy_url,
            "-H",
            f"@{header}",
            f"http://web.test:{world.web.port}/big",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.startswith("HTTP/1.1 431"), (out.stdout, out.stderr)
    assert "x-egress-reason: request head too large" in out.stdout  # ours, not the upstream's
    assert world.web.seen.connections == before


def test_a_head_that_never_completes_gets_408_and_is_closed(world: World) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=10) as sock:
        sock.sendall(f"GET http://web.test:{world.web.port}/slow HTTP/1.1\r\n".encode())
        for _ in range(3):  # a slowloris: a header line now and then, never the blank line
            time.sleep(HEAD_TIMEOUT / 4)
            sock.sendall(b"X-Drip: 1\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    elapsed = time.monotonic() - start
    status, headers, body = _head(answer)
    assert status == 408 and headers["x-egress-reason"] == "request head timeout"
    assert HEAD_TIMEOUT <= elapsed < HEAD_TIMEOUT + 3
    assert b"not complete within 1 s" in body


def test_keep_alive_requests_each_get_a_fresh_head_budget(world: World) -> None:
    """The timeout runs from a head's first byte: an idle keep-alive connection is not refused."""
    with requests.Session() as session:
        proxies = {"http": world.sidecar.proxy_url}
        url = f"http://web.test:{world.web.port}/keep"
        assert session.get(url, proxies=proxies, timeout=10).status_code == 200
        time.sleep(HEAD_TIMEOUT * 1.5)
        assert session.get(url, proxies=proxies, timeout=10).status_code == 200


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def test_a_header_that_never_ends_does_not_grow_memory(world: World) -> None:
    """64 MiB of one header line: the proxy's peak RSS grows < 10 MB and the client gets 431."""
    pid = world.sidecar.proc.pid
    peak_before = _vm(pid, "VmHWM")
    sent = 0
    sock = socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=10)
    answer = b""

    def drain() -> None:
        nonlocal answer
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    chunk = b"v" * (1 << 20)
    deadline = time.monotonic() + 20
    try:
        sock.sendall(f"GET http://web.test:{world.web.port}/x HTTP/1.1\r\nX-Endless: ".encode())
        while sent < 64 << 20 and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the proxy closed after answering; what it read it discarded
    reader.join(10)
    sock.close()
    growth = _vm(pid, "VmHWM") - peak_before
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert growth < 10 << 20, f"peak RSS grew by {growth / 2**20:.1f} MiB after {sent >> 20} MiB"


# -- item 7: L7 rules and opaque channels ------------------------------------------------------


def test_connect_to_a_host_allowed_only_for_some_methods_and_paths_is_refused(
    world: World,
) -> None:
    before = world.l7.seen.connections
    sock, head = world.sidecar.connect_tunnel(f"l7.test:{world.l7.port}")
    with sock:
        if head.startswith(b"HTTP/1.1 200"):  # without the fix: anything goes through
            sock.sendall(b"POST /admin HTTP/1.1\r\nHost: l7.test\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
    text = head.decode()
    assert text.startswith("HTTP/1.1 403"), text
    assert "x-egress-reason: l7 conditions not visible" in text
    assert not [r for r in world.l7.seen.requests if r["path"] == "/admin"]
    assert world.l7.seen.connections == before
    span = world.spans(
        lambda s: s.name == "CONNECT" and s.attributes.get("server.address") == "l7.test"
    )[-1]
    assert span.attributes["egress.reason"] == "l7 conditions not visible"
    assert "methods and paths" in span.attributes["egress.reason.detail"]


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/ok/1", 200), ("POST", "/admin", 403)]
)
def test_the_same_rule_still_decides_plain_http_by_method_and_path(
    world: World, method: str, path: str, status: int
) -> None:
    r = requests.request(
        method,
        f"http://l7.test:{world.l7.port}{path}",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == status


# -- item 16: failures are our own answers and say which side -----------------------------------


def test_a_refused_upstream_gets_our_502_and_its_span_says_so(world: World) -> None:
    r = requests.get(
        f"http://closed.test:{CLOSED_PORT}/x", proxies={"http": world.sidecar.proxy_url}, timeout=10
    )
    assert r.status_code == 502
    assert r.headers["x-egress-decision"] == "allow"
    assert r.headers["x-egress-reason"] == "upstream connection refused"
    assert r.headers["x-egress-error"] == "connection_refused"
    assert r.text.count("\n") == 1 and f"closed.test:{CLOSED_PORT}" in r.text
    assert "<html" not in r.text.lower()
    span = world.spans(lambda s: s.attributes.get("server.address") == "closed.test")[-1]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["http.response.status_code"] == 502
    assert span.attributes["error.type"] == "connection_refused"
    assert "111" in span.attributes["egress.upstream.error"]


def test_an_upstream_that_closes_before_answering_gets_502_upstream_disconnected(
    world: World,
) -> None:
    r = requests.get(
        f"http://raw.test:{world.gone.port}/gone",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == 502
    assert r.headers["x-egress-error"] == "upstream_disconnected"
    span = world.spans(lambda s: str(s.attributes.get("url.full", "")).endswith("/gone"))[-1]
    assert span.attributes["http.response.status_code"] == 502
    assert span.attributes["error.type"] == "upstream_disconnected"


def test_an_upstream_that_ends_mid_body_is_upstream_disconnected(world: World) -> None:
    with pytest.raises(requests.exceptions.RequestException):
        _ = requests.get(
            f"http://raw.test:{world.truncated.port}/truncated",
            proxies={"http": world.sidecar.proxy_url},
            timeout=10,
        ).content  # reading the body is the point
    span = world.spans(lambda s: str(s.attributes.get("url.full", "")).endswith("/truncated"))[-1]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["http.response.status_code"] == 200  # its head had gone out
    assert span.attributes["error.type"] == "upstream_disconnected"


def test_a_client_that_leaves_mid_response_is_client_disconnected(world: World) -> None:
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=10) as sock:
        sock.sendall(
            f"GET http://raw.test:{world.stalled.port}/leave HTTP/1.1\r\n"
            "Host: raw.test\r\n\r\n".encode()
        )
        head = recv_head(sock)
        assert head.startswith(b"HTTP/1.1 200")
    span = world.spans(lambda s: str(s.attributes.get("url.full", "")).endswith("/leave"))[-1]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "client_disconnected"
    assert span.attributes["http.response.status_code"] == 200


# -- fuzzing the request head --------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_request_heads_never_crash_and_never_pass_the_policy(
    world: World, data: st.DataObject
) -> None:
    raw = data.draw(request_heads(ports=[world.web.port, 80, 0]))
    denied_before = world.denied.seen.connections
    answer = _exchange(world.sidecar.explicit_port, raw, timeout=HEAD_TIMEOUT + 5)
    if answer:
        status, headers, _ = _head(answer)
        ours = "x-egress-decision" in headers
        # Every answer is the upstream's (its server header) or ours; never mitmproxy's error
        # page, and a 5xx of ours names the upstream failure.
        assert ours or headers.get("server", "").startswith("BaseHTTP"), answer[:300]
        if ours and status >= 500:
            assert headers.get("x-egress-error"), answer[:300]
    assert world.denied.seen.connections == denied_before, raw
    # Every request an upstream received names an allowed host (the port off first, then the
    # root dot: "WEB.test.:8080" is web.test).
    strays = [
        r
        for r in world.web.seen.requests + world.l7.seen.requests
        if r["headers"].get("host", "").lower().rsplit(":", 1)[0].rstrip(".")
        not in ("web.test", "l7.test")
    ]
    assert not strays, (raw, strays)
    assert all(r["method"] == "GET" and r["path"] == "/ok/1" for r in world.l7.seen.requests)
    assert not [line for line in world.sidecar.stderr if "Traceback" in line or "crash" in line]
