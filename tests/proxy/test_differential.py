"""The fast path against the reference engine: one corpus of raw request heads (ordinary calls,
the smuggling and header-abuse shapes, hypothesis-generated heads) sent to a sidecar running
``--engine fast`` and to one running ``--engine mitmproxy``, each in front of the same recording
upstream. Each case must get the same decision (status class and x-egress-reason) and put the
same bytes at the upstream, or be refused by the fast path (a 4xx, nothing upstream).

Normalised before comparing, and why:
- the traceparent value: each engine's span has its own random trace and span ids (that the
  header is there, where it is in the head, is compared);
- a chunked body's chunk sizes: both engines re-chunk what they relay as it arrives, so the
  chunk boundaries follow the reads; the decoded body is compared.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.http_heads import request_heads
from tests.support.sidecar import Sidecar, start_sidecar

UPSTREAM = "127.0.0.61"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
READ_SECONDS = 3.0  # an exchange neither side ends by then is compared as it stands


@dataclass
class Recording:
    """What the upstream received: one (head, decoded body) per request, in order."""

    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RecordingUpstream:
    """Reads one request per connection (head, then a Content-Length or chunked body), records
    it, answers 200 and closes: neither engine can reuse the connection, so each request's bytes
    stand alone."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.seen = Recording()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        client.settimeout(READ_SECONDS)
        buf = b""
        with client, contextlib.suppress(OSError):
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            head += b"\r\n\r\n"
            lowered = head.lower()
            body = b""
            length = re.search(rb"\r\ncontent-length: *(\d+)", lowered)
            if b"\r\ntransfer-encoding: chunked" in lowered:
                body = self._chunked(client, rest)
            elif length is not None:
                want = int(length.group(1))
                while len(rest) < want:
                    data = client.recv(65536)
                    if not data:
                        break
                    rest += data
                body = rest[:want]
            with self.seen.lock:
                self.seen.requests.append((head, body))
            client.sendall(ANSWER)

    @staticmethod
    def _chunked(client: socket.socket, buf: bytes) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += client.recv(65536)
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                return body
            while len(buf) < size + 2:
                buf += client.recv(65536)
            body += buf[:size]
            buf = buf[size + 2 :]

    def take(self) -> list[tuple[bytes, bytes]]:
        with self.seen.lock:
            out, self.seen.requests = self.seen.requests, []
        return out

    def stop(self) -> None:
        self.sock.close()


@dataclass
class World:
    upstream: RecordingUpstream
    fast: Sidecar
    reference: Sidecar


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    upstream = RecordingUpstream(UPSTREAM)
    allowlist = (
        f"allow:\n  - host: web.test\n    ports: [{upstream.port}]\n"
        f"  - host: l7.test\n    ports: [{upstream.port}]\n    methods: [GET]\n"
        f"    paths: ['/ok/*']\n"
    )
    hosts = {"web.test": UPSTREAM, "l7.test": UPSTREAM, "denied.test": UPSTREAM}
    sidecars = {}
    for engine in ("fast", "mitmproxy"):
        sidecars[engine] = start_sidecar(
            tmp_path_factory.mktemp(f"differential-{engine}"),
            allowlist=allowlist,
            hosts=hosts,
            args=["--allow-private-range", "127.0.0.0/8", "--engine", engine],
        )
    yield World(upstream, sidecars["fast"], sidecars["mitmproxy"])
    for sidecar in sidecars.values():
        assert sidecar.stop() == 0, sidecar.stderr[-20:]
    upstream.stop()


@dataclass(frozen=True)
class Outcome:
    status: int | None  # the first answer's status (None: no answer)
    reason: str | None  # its x-egress-reason
    upstream: list[tuple[bytes, bytes]]


def _normalise(recorded: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [
        (re.sub(rb"(?im)^(traceparent): [^\r\n]*", rb"\1: <traceparent>", head), body)
        for head, body in recorded
    ]


def _send(world: World, sidecar: Sidecar, raw: bytes) -> Outcome:
    answer = b""
    with socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=READ_SECONDS) as s:
        s.sendall(raw)
        deadline = time.monotonic() + READ_SECONDS
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and (chunk := s.recv(65536)):
                answer += chunk
    time.sleep(0.02)  # the upstream records before it answers; its thread may lag the answer
    # Interim answers (100 Continue) are skipped: the reference says 100 even to a request it
    # then denies; the fast path denies at once. The final answer is what is compared.
    while re.match(rb"HTTP/1\.[01] 1\d\d ", answer) and b"\r\n\r\n" in answer:
        answer = answer.split(b"\r\n\r\n", 1)[1]
    status = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    reason = re.search(rb"(?im)^x-egress-reason: ([^\r\n]*)", answer.split(b"\r\n\r\n")[0])
    return Outcome(
        int(status.group(1)) if status else None,
        reason.group(1).decode() if reason else None,
        _normalise(world.upstream.take()),
    )


# How the cases ended (checked last: the corpus must exercise relaying, not only refusals).
TALLY = {"relayed": 0, "refused": 0, "same-answer": 0}
REFUSED: list[str] = []  # refused by the fast path where the reference answered otherwise


def _compare(world: World, raw: bytes) -> None:
    fast = _send(world, world.fast, raw)
    reference = _send(world, world.reference, raw)
    if fast.upstream:
        TALLY["relayed"] += 1
    elif fast.status == reference.status:
        TALLY["same-answer"] += 1
    else:
        TALLY["refused"] += 1
        REFUSED.append(
            f"{raw[:60]!r}: fast {fast.status} {fast.reason}, "
            f"reference {reference.status} {reference.reason}"
        )
    if fast.status is not None and 400 <= fast.status < 500 and not fast.upstream:
        # The fast path refused (or denied) it and nothing went upstream: always allowed, even
        # where the reference names another reason (e.g. ``http://a@b/``: the reference's URL
        # parser calls it an invalid request, the fast path's authority reading an invalid
        # destination). A denial must still be one where the reference denied or refused too.
        if fast.status == 403:
            assert reference.status == 403 or not reference.upstream, (raw, fast, reference)
            assert fast.reason == reference.reason, (raw, fast, reference)
        return
    same_class = (fast.status or 0) // 100 == (reference.status or 0) // 100
    assert same_class and fast.reason == reference.reason, (raw, fast, reference)
    assert fast.upstream == reference.upstream, (raw, fast.upstream, reference.upstream)


W = "web.test:{port}"
CORPUS = {
    "get": "GET http://{w}/a?b=1 HTTP/1.1\r\nHost: {w}\r\nUser-Agent: t\r\nAccept: */*\r\n"
    "Connection: close\r\n\r\n",
    "get-http10": "GET http://{w}/ HTTP/1.0\r\nHost: {w}\r\n\r\n",
    "head": "HEAD http://{w}/h HTTP/1.1\r\nHost: {w}\r\nConnection: close\r\n\r\n",
    "post-length": "POST http://{w}/p HTTP/1.1\r\nHost: {w}\r\nContent-Length: 5\r\n"
    "Content-Type: text/plain\r\nConnection: close\r\n\r\nhello",
    "post-chunked": "POST http://{w}/c HTTP/1.1\r\nHost: {w}\r\nTransfer-Encoding: chunked\r\n"
    "Connection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
    "origin-form": "GET /o HTTP/1.1\r\nHost: {w}\r\nConnection: close\r\n\r\n",
    "origin-form-denied": "GET /o HTTP/1.1\r\nHost: denied.test:{port}\r\n"
    "Connection: close\r\n\r\n",
    "no-host": "GET http://{w}/nh HTTP/1.1\r\nConnection: close\r\n\r\n",
    "host-disagrees": "GET http://{w}/x HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n",
    "host-case": "GET http://{w}/x HTTP/1.1\r\nHost: WEB.test:{port}\r\nConnection: close\r\n\r\n",
    "hop-by-hop": "GET http://{w}/hop HTTP/1.1\r\nHost: {w}\r\nConnection: close, X-Secret\r\n"
    "X-Secret: s\r\nKeep-Alive: 5\r\nProxy-Connection: keep-alive\r\n"
    "Proxy-Authorization: Basic eDp5\r\nX-Kept: k\r\n\r\n",
    "traceparent": "GET http://{w}/t HTTP/1.1\r\nHost: {w}\r\n"
    "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
    "Connection: close\r\n\r\n",
    "denied": "GET http://denied.test:{port}/ HTTP/1.1\r\nHost: denied.test\r\n"
    "Connection: close\r\n\r\n",
    "l7-allowed": "GET http://l7.test:{port}/ok/1 HTTP/1.1\r\nHost: l7.test\r\n"
    "Connection: close\r\n\r\n",
    "l7-path-denied": "GET http://l7.test:{port}/admin HTTP/1.1\r\nHost: l7.test\r\n"
    "Connection: close\r\n\r\n",
    "l7-method-denied": "DELETE http://l7.test:{port}/ok/1 HTTP/1.1\r\nHost: l7.test\r\n"
    "Connection: close\r\n\r\n",
    "https-target": "GET https://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    "userinfo": "GET http://{w}@denied.test:{port}/ HTTP/1.1\r\nHost: {w}\r\n\r\n",
    "backslash": "GET http://{w}\\@denied.test/ HTTP/1.1\r\nHost: {w}\r\n\r\n",
    "fragment": "GET http://denied.test#@{w}/ HTTP/1.1\r\nHost: {w}\r\n\r\n",
    "te-cl": "POST http://{w}/ HTTP/1.1\r\nHost: {w}\r\nContent-Length: 5\r\n"
    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-xchunked": "POST http://{w}/ HTTP/1.1\r\nHost: {w}\r\nTransfer-Encoding: xchunked\r\n"
    "\r\n0\r\n\r\n",
    "cl-cl": "POST http://{w}/ HTTP/1.1\r\nHost: {w}\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
    "\r\nhello!",
    "obs-fold": "GET http://{w}/ HTTP/1.1\r\nHost: {w}\r\nX-F: a\r\n b\r\n"
    "Connection: close\r\n\r\n",
    "two-hosts": "GET http://{w}/ HTTP/1.1\r\nHost: {w}\r\nHost: denied.test\r\n"
    "Connection: close\r\n\r\n",
    "bad-host": "GET /x HTTP/1.1\r\nHost: web.test:abc\r\nConnection: close\r\n\r\n",
    "space-in-name": "GET http://{w}/ HTTP/1.1\r\nHost: {w}\r\nBad Header: x\r\n\r\n",
    "nul-in-value": "GET http://{w}/ HTTP/1.1\r\nHost: {w}\r\nX: a\x00b\r\n\r\n",
    "version-2": "GET http://{w}/ HTTP/2.0\r\nHost: {w}\r\nConnection: close\r\n\r\n",
    # An HTTP/2 version on an HTTP/1 line once let mitmproxy keep a Host the policy never saw.
    "version-2-other-host": "GET http://{w}/ HTTP/2.0\r\nHost: denied.test\r\n"
    "Connection: close\r\n\r\n",
    "version-1.2": "GET http://{w}/ HTTP/1.2\r\nHost: {w}\r\nConnection: close\r\n\r\n",
    "lowercase-method": "get http://{w}/ HTTP/1.1\r\nHost: {w}\r\nConnection: close\r\n\r\n",
    "pipelined": "GET http://{w}/1 HTTP/1.1\r\nHost: {w}\r\n\r\n"
    "GET http://denied.test:{port}/2 HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n",
    "expect-continue": "POST http://{w}/e HTTP/1.1\r\nHost: {w}\r\nExpect: 100-continue\r\n"
    "Content-Length: 5\r\nConnection: close\r\n\r\nhello",
    "expect-continue-denied": "POST http://denied.test:{port}/e HTTP/1.1\r\nHost: denied.test\r\n"
    "Expect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    "token-query": "GET http://{w}/s?token=abc&x=1 HTTP/1.1\r\nHost: {w}\r\nConnection: close"
    "\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_the_corpus_is_decided_and_relayed_as_the_reference_does(world: World, case: str) -> None:
    port = world.upstream.port
    raw = CORPUS[case].format(w=W.format(port=port), port=port).encode("latin-1")
    _compare(world, raw)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=request_heads([0]))
def test_generated_heads_are_decided_and_relayed_as_the_reference_does(
    world: World, data: bytes
) -> None:
    # request_heads names port 0 (fixed before the world exists); it becomes the upstream's.
    raw = data.replace(b":0/", f":{world.upstream.port}/".encode()).replace(
        b":0 ", f":{world.upstream.port} ".encode()
    )
    _compare(world, raw)


def test_no_mitmproxy_on_the_fast_sidecar_for_ordinary_calls(world: World) -> None:
    """Everything above but a handed-over few ran on the fast path: the ordinary calls never
    loaded the second tier (checked after the corpus: its log says why it was loaded)."""
    print(f"\ndifferential: {TALLY}", *REFUSED, sep="\n  ")
    assert TALLY["relayed"] >= 10, TALLY
    loads = [line for line in world.fast.stderr if "loaded mitmproxy" in line]
    handed = ("Upgrade", "Expect", "CONNECT", "request line")
    assert all(any(why in line for why in handed) for line in loads), loads
