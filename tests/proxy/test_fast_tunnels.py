"""CONNECT tunnels on the fast path (the default engine), where it does more than the reference:

- the relay's backpressure: a client that reads slowly holds the upstream back, so 50 MB pass
  with the sidecar's memory bounded;
- half-close passes through (the client's EOF reaches the upstream, which still answers);
- a client that sends its CONNECT and leaves at once, or leaves while the upstream is being
  dialled, gets one decision line, and the sidecar lets go of everything;
- a partial ClientHello is refused at --first-byte-timeout (the reference waits for ever), while
  a silent tunnel is not settled by that timer (a fronted ClientHello sent later is refused);
- the same decision lines and the same answers as the reference engine (``--engine mitmproxy``)
  for a corpus of tunnels, the two sidecars in front of the same upstreams with the same policy;
- a churn of tunnels of every kind leaves no descriptor and no memory behind.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.proxy.test_tunnels_e2e import Recorder, client_hello, read_until_closed
from tests.support.faults import RssSampler, open_fds, rss_bytes
from tests.support.sidecar import Sidecar, free_port, start_sidecar
from tests.support.sockets import HEAD_END, recv_head, serve_each

REC, SOURCE, BANNER, CLOSED, BLACKHOLE, CHATTY = (
    "127.0.0.71",
    "127.0.0.72",
    "127.0.0.73",
    "127.0.0.74",
    "127.0.0.75",
    "127.0.0.76",
)
GREETING = bytes(range(256)) * 8192  # 2 MiB the chatty server sends before reading anything
CLOSED_PORT = free_port(CLOSED)  # nothing listens there
ALERT = b"\x15\x03\x01\x00\x02\x01\x5a"  # a TLS warning alert record before the ClientHello


@dataclass
class Source:
    """A raw upstream: reads ``SEND <n>\\n``, sends n bytes as fast as it can, closes; counts
    what it sent (so a test sees how far ahead of the client it got)."""

    host: str
    sent: list[int] = field(default_factory=list)

    def start(self) -> Source:
        self.sock = socket.create_server((self.host, 0))
        self.port = int(self.sock.getsockname()[1])
        serve_each(self.sock, self._serve)
        return self

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            line = recv_head(conn, b"\n", limit=64)
            size = int(line.split()[1])
            index = len(self.sent)
            self.sent.append(0)
            chunk = bytes(1 << 18)
            with contextlib.suppress(OSError):
                while self.sent[index] < size:
                    piece = chunk[: size - self.sent[index]]
                    conn.sendall(piece)
                    self.sent[index] += len(piece)

    def stop(self) -> None:
        self.sock.close()


@dataclass
class World:
    fast: Sidecar
    reference: Sidecar
    rec: Recorder
    source: Source
    banner: Recorder
    blackhole_port: int
    chatty: Recorder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fast-tunnels")
    rec = Recorder(REC, echo=True).start()
    source = Source(SOURCE).start()
    banner = Recorder(BANNER, banner=b"220 banner.test ESMTP\r\n", echo=True).start()
    chatty = Recorder(CHATTY, banner=GREETING, echo=True).start()
    blackhole = socket.create_server((BLACKHOLE, 0), backlog=0)
    blackhole_port = int(blackhole.getsockname()[1])
    filler = socket.create_connection((BLACKHOLE, blackhole_port), timeout=2)
    # One policy file for both sidecars: the decision lines name it (source and version).
    policy = tmp / "allowlist.yaml"
    policy.write_text(
        f"""
allow:
  - host: rec.test
    ports: [{rec.port}]
  - host: source.test
    ports: [{source.port}]
  - host: banner.test
    ports: [{banner.port}]
  - host: closed.test
    ports: [{CLOSED_PORT}]
  - host: blackhole.test
    ports: [{blackhole_port}]
  - host: chatty.test
    ports: [{chatty.port}]
  - cidr: {REC}/32
    ports: [{rec.port}]
deny:
  - denied.test
"""
    )
    hosts = {
        "rec.test": REC,
        "source.test": SOURCE,
        "banner.test": BANNER,
        "closed.test": CLOSED,
        "blackhole.test": BLACKHOLE,
        "chatty.test": CHATTY,
        "denied.test": REC,
        "other.test": REC,
    }
    common = ["--allowlist-file", str(policy), "--allow-private-range", "127.0.0.0/8"]
    common += ["--connect-timeout", "2", "--first-byte-timeout", "1"]
    fast = start_sidecar(tmp / "fast", hosts=hosts, args=common)
    reference = start_sidecar(
        tmp / "reference", hosts=hosts, args=[*common, "--engine", "mitmproxy"]
    )
    yield World(fast, reference, rec, source, banner, blackhole_port, chatty)
    # Both stopped (and every upstream) before anything is asserted: a failure leaves no process.
    tracebacks = [line for car in (fast, reference) for line in car.stderr if "Traceback" in line]
    codes = [car.stop() for car in (fast, reference)]
    for server in (rec, source, banner, chatty):
        server.stop()
    filler.close()
    blackhole.close()
    assert codes == [0, 0], (fast.stderr[-20:], reference.stderr[-20:])
    assert tracebacks == [], tracebacks[:3]


def _quiet(sidecar: Sidecar) -> list[dict[str, Any]]:
    """The decision lines once none came for 0.2 s: lines leave in batches (every ~20 ms), so a
    count taken at once could miss the last lines of what came before."""
    lines, deadline = sidecar.decisions(), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = sidecar.decisions()
        if len(now) == len(lines):
            break
        lines = now
    return lines


def _lines_for(sidecar: Sidecar, host: str) -> list[dict[str, Any]]:
    return [d for d in sidecar.decisions() if d.get("host") == host]


def _settled_fds(pid: int, baseline: int, slack: int = 4, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (fds := open_fds(pid)) > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.05)
    return fds


# -- the relay --------------------------------------------------------------------------------


def test_a_slow_reader_holds_the_upstream_back_and_memory_stays_bounded(world: World) -> None:
    size = 50_000_000
    sampler = RssSampler(world.fast.proc.pid, interval=0.02)
    sock, head = world.fast.connect_tunnel(f"source.test:{world.source.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    index = len(world.source.sent)
    sock.sendall(f"SEND {size}\n".encode())
    buf = bytearray(1 << 16)
    got = len(head.split(HEAD_END, 1)[1])
    ahead = 0  # the most the upstream was ever ahead of this client
    started = time.monotonic()
    while got < size:
        n = sock.recv_into(buf)
        assert n, f"the tunnel ended after {got} of {size} bytes"
        got += n
        if len(world.source.sent) > index:
            ahead = max(ahead, world.source.sent[index] - got)
        time.sleep(0.001)  # a slow reader: ~30 MB/s at most, the upstream sends GB/s
        assert time.monotonic() - started < 60, got
    sock.close()
    peak = sampler.stop()
    growth = peak - sampler.start
    took = time.monotonic() - started
    print(
        f"\nslow reader: {size / 1e6:.0f} MB in {took:.1f} s, upstream at most "
        f"{ahead / 1e6:.1f} MB ahead, sidecar RSS +{growth / 2**20:.1f} MiB"
    )
    assert got == size
    # Without backpressure the sidecar would hold most of the 50 MB; the kernel's socket
    # buffers (both sides of the sidecar) hold a few MB at most.
    assert growth < 16 << 20, growth
    assert ahead < 20_000_000, ahead


def test_half_close_passes_through_a_tunnel(world: World) -> None:
    """The client sends, then shuts its sending side: the upstream (an echo server that answers
    until EOF, then closes) sees the EOF and its answer still reaches the client."""
    sock, head = world.fast.connect_tunnel(f"rec.test:{world.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(b"ping through a half-closed tunnel")
    sock.shutdown(socket.SHUT_WR)
    assert read_until_closed(sock, 5) == b"ping through a half-closed tunnel"
    sock.close()


def test_a_server_that_says_much_before_the_clienthello_is_relayed_whole(world: World) -> None:
    """2 MiB from the server while the ClientHello is still partial: held (its reading paused
    past a bound), then relayed whole once the ClientHello settles the tunnel."""
    hello = client_hello("chatty.test")
    sock, head = world.fast.connect_tunnel(f"chatty.test:{world.chatty.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(hello[:50])
    time.sleep(0.3)  # the greeting arrives meanwhile: more than the sidecar holds
    sock.sendall(hello[50:])
    want = len(GREETING) + len(hello)
    data = bytearray(head.split(HEAD_END, 1)[1])
    sock.settimeout(5)
    while len(data) < want and (chunk := sock.recv(1 << 20)):
        data += chunk
    sock.close()
    assert len(data) == want and data[: len(GREETING)] == GREETING and data.endswith(hello)


def test_a_clienthello_sent_along_with_the_connect_is_peeked_and_relayed(world: World) -> None:
    """In the CONNECT's own segment, then the sending side shut: decided on it, relayed, the
    EOF passed on (the echo upstream answers, then closes)."""
    hello = client_hello("rec.test")
    authority = f"rec.test:{world.rec.port}"
    sock = socket.create_connection(("127.0.0.1", world.fast.explicit_port), timeout=5)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + hello)
    sock.shutdown(socket.SHUT_WR)
    head, _, rest = read_until_closed(sock, 5).partition(HEAD_END)
    sock.close()
    assert head.startswith(b"HTTP/1.1 200 ") and rest == hello, (head, len(rest))


# -- clients that leave ---------------------------------------------------------------------------


def test_a_connect_then_an_immediate_close_gets_one_decision_and_leaves_nothing(
    world: World,
) -> None:
    pid = world.fast.proc.pid
    baseline = open_fds(pid)
    before = len([d for d in _quiet(world.fast) if d.get("host") == "rec.test"])
    mark = world.rec.mark()
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", world.fast.explicit_port), timeout=5)
        authority = f"rec.test:{world.rec.port}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        sock.close()
    world.fast.wait_decisions(lambda d: d.get("host") == "rec.test", count=before + 20)
    time.sleep(0.3)  # a second line per tunnel would show up by now
    assert len(_lines_for(world.fast, "rec.test")) == before + 20
    for conn in world.rec.closed_since(mark):
        assert conn.closed and conn.received == b""
    assert _settled_fds(pid, baseline) <= baseline + 4
    assert world.fast.health("/healthz/ready")[0] == 200


def test_a_client_leaving_during_the_dial_is_reported_at_once(world: World) -> None:
    """The upstream never answers (--connect-timeout 2): the client gives up first (a reset);
    its one decision line comes when it leaves, and the dial is abandoned. A client that only
    half-closes may still read its answer: it gets the 504 when the connect times out."""
    pid = world.fast.proc.pid
    baseline = open_fds(pid)
    before = len([d for d in _quiet(world.fast) if d.get("host") == "blackhole.test"])
    authority = f"blackhole.test:{world.blackhole_port}"
    connect = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", world.fast.explicit_port), timeout=5)
    sock.sendall(connect)
    time.sleep(0.3)
    left = time.monotonic()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset
    line = world.fast.wait_decisions(
        lambda d: d.get("host") == "blackhole.test", count=before + 1, timeout=5
    )[-1]
    assert time.monotonic() - left < 1.5  # not at the connect timeout
    assert line["decision"] == "allow" and "status" not in line, line

    half = socket.create_connection(("127.0.0.1", world.fast.explicit_port), timeout=5)
    half.sendall(connect)
    half.shutdown(socket.SHUT_WR)
    answer = read_until_closed(half, 5)
    half.close()
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    line = world.fast.wait_decisions(
        lambda d: d.get("host") == "blackhole.test", count=before + 2, timeout=5
    )[-1]
    assert line["status"] == 504 and "timed out" in line["error"], line
    time.sleep(0.3)
    assert len(_lines_for(world.fast, "blackhole.test")) == before + 2
    assert _settled_fds(pid, baseline) <= baseline + 4


def test_clients_resetting_while_their_answer_is_written_raise_nothing(world: World) -> None:
    """A client that closes (or resets) right after its CONNECT: the answer (403, 502) and the
    half-close after it meet a connection already gone (on loopback the answer's own send brings
    back the reset, then the shutdown fails): one line each, no error."""
    before = len(_quiet(world.fast))
    targets = [f"closed.test:{CLOSED_PORT}", f"denied.test:{world.rec.port}"] * 50
    for i, authority in enumerate(targets):
        sock = socket.create_connection(("127.0.0.1", world.fast.explicit_port), timeout=5)
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        if i % 4 >= 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    world.fast.wait_decisions(count=before + len(targets))
    time.sleep(0.3)
    assert len(world.fast.decisions()) == before + len(targets)
    errors = [line for line in world.fast.stderr if '"level":"error"' in line]
    assert not errors, errors[:2]


# -- the first flight's bound ---------------------------------------------------------------------


def test_a_partial_clienthello_is_refused_at_the_bound(world: World) -> None:
    hello = client_hello("rec.test")
    mark = world.rec.mark()
    sock, head = world.fast.connect_tunnel(f"rec.test:{world.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    started = time.monotonic()
    sock.sendall(hello[:100])
    assert read_until_closed(sock, 5) == b""
    took = time.monotonic() - started
    sock.close()
    assert 0.8 < took < 3, took  # --first-byte-timeout 1
    (conn,) = world.rec.closed_since(mark)
    assert conn.received == b""
    line = world.fast.wait_decisions(lambda d: d.get("reason") == "unreadable first flight")[-1]
    assert line["decision"] == "deny" and line["host"] == "rec.test"


def test_a_silent_tunnel_is_not_settled_by_the_timer(world: World) -> None:
    """Past the bound with nothing sent, the tunnel still waits for its first flight: a
    fronted ClientHello sent then is refused, not relayed on the CONNECT's decision."""
    mark = world.rec.mark()
    sock, head = world.fast.connect_tunnel(f"rec.test:{world.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    time.sleep(1.5)
    sock.sendall(client_hello("evil.example"))
    assert read_until_closed(sock, 5) == b""
    sock.close()
    (conn,) = world.rec.closed_since(mark)
    assert conn.received == b""
    line = world.fast.wait_decisions(
        lambda d: d.get("reason") == "sni mismatch" and "evil.example" in d.get("detail", "")
    )[-1]
    assert line["decision"] == "deny"


# -- the same as the reference engine -------------------------------------------------------------


def _exchange(sidecar: Sidecar, authority: str, send: bytes, raw_head: bytes | None) -> bytes:
    """One tunnel: the CONNECT (or ``raw_head``), then ``send``; what the client received."""
    sock = socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=5)
    with sock:
        sock.sendall(
            raw_head or f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        )
        head = recv_head(sock, bufsize=4096)
        if head.split(b" ", 2)[1:2] != [b"200"]:
            return head + read_until_closed(sock, 5)
        if send:
            sock.sendall(send)
        sock.settimeout(0.5)
        rest = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                rest += chunk
        return head + rest


def _corpus(world: World) -> list[tuple[str, str, bytes, bytes | None]]:
    rec, banner = f"rec.test:{world.rec.port}", f"banner.test:{world.banner.port}"
    return [
        ("allowed, matching SNI", rec, client_hello("rec.test"), None),
        ("allowed, no SNI", rec, client_hello(None), None),
        ("allowed, not TLS", rec, b"hello", None),
        ("name in another case", f"REC.Test:{world.rec.port}", client_hello("rec.test"), None),
        ("sni mismatch", rec, client_hello("other.test"), None),
        ("unreadable", rec, ALERT + client_hello("rec.test"), None),
        ("IP literal by cidr", f"{REC}:{world.rec.port}", client_hello(None), None),
        ("IP literal, named SNI", f"{REC}:{world.rec.port}", client_hello("rec.test"), None),
        ("server speaks first", banner, b"", None),
        ("denied host", f"denied.test:{world.rec.port}", b"", None),
        ("unlisted host", f"other.test:{world.rec.port}", b"", None),
        ("unlisted port", f"rec.test:{world.rec.port + 1}", b"", None),
        ("refused upstream", f"closed.test:{CLOSED_PORT}", b"", None),
        ("HTTP/1.0", rec, b"x", f"CONNECT {rec} HTTP/1.0\r\n\r\n".encode()),
        ("no port", rec, b"", b"CONNECT rec.test HTTP/1.1\r\nHost: rec.test\r\n\r\n"),
        ("userinfo", rec, b"", f"CONNECT u@{rec} HTTP/1.1\r\n\r\n".encode()),
    ]


def _comparable(line: dict[str, Any]) -> dict[str, Any]:
    # The time differs; everything else must not.
    return {k: v for k, v in line.items() if k != "ts"}


def test_both_engines_write_the_same_decision_lines_and_answers(world: World) -> None:
    differences = []
    for name, authority, send, raw_head in _corpus(world):
        seen = []
        for sidecar in (world.fast, world.reference):
            before = len(_quiet(sidecar))
            answer = _exchange(sidecar, authority, send, raw_head)
            lines = sidecar.wait_decisions(count=before + 1)[before:]
            time.sleep(0.1)  # a second line would show up by now (lines leave every 20 ms)
            lines = sidecar.decisions()[before:]
            seen.append((answer, [_comparable(x) for x in lines]))
        (fast_answer, fast_lines), (ref_answer, ref_lines) = seen
        if fast_lines != ref_lines or fast_answer != ref_answer:
            differences.append((name, fast_answer, ref_answer, fast_lines, ref_lines))
    assert not differences, "\n\n".join(
        f"{name}:\n fast  {fa!r}\n ref   {ra!r}\n fast  {fl}\n ref   {rl}"
        for name, fa, ra, fl, rl in differences
    )


def test_tunnels_are_served_without_loading_mitmproxy(world: World) -> None:
    """Last: everything above on the fast path ran without the second tier."""
    maps = Path(f"/proc/{world.fast.proc.pid}/maps").read_text()
    assert "mitmproxy_rs" not in maps
    assert not any("loaded mitmproxy" in line for line in world.fast.stderr)


def test_a_churn_of_tunnels_leaves_nothing_behind(world: World) -> None:
    """800 tunnels from 8 clients at once, of four kinds (relayed, denied, fronted, left at
    once): one decision line each, and the sidecar's descriptors and memory come back."""
    pid = world.fast.proc.pid
    baseline_fds, baseline_rss = open_fds(pid), rss_bytes(pid)
    before = len(_quiet(world.fast))
    rec = f"rec.test:{world.rec.port}"
    hello = client_hello("other.test")
    errors: list[BaseException] = []

    def tunnel(kind: int) -> None:
        authority = f"denied.test:{world.rec.port}" if kind == 1 else rec
        sock = socket.create_connection(("127.0.0.1", world.fast.explicit_port), timeout=10)
        with sock:
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            if kind == 3:
                return  # gone before the answer
            head = recv_head(sock, bufsize=4096)
            if kind == 1:
                assert head.startswith(b"HTTP/1.1 403 "), head
                return
            assert head.startswith(b"HTTP/1.1 200 "), head
            sock.sendall(b"ping" if kind == 0 else hello)
            answer = read_until_closed(sock, 5) if kind == 2 else sock.recv(16)
            assert answer == (b"ping" if kind == 0 else b""), answer

    def client(first: int) -> None:
        try:
            for i in range(100):
                tunnel((first + i) % 4)
        except BaseException as err:  # the test reports it, with the others
            errors.append(err)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - started
    assert not errors, errors[:3]
    world.fast.wait_decisions(count=before + 800, timeout=10)
    time.sleep(0.5)
    assert len(world.fast.decisions()) == before + 800
    fds = _settled_fds(pid, baseline_fds)
    growth = rss_bytes(pid) - baseline_rss
    print(
        f"\nchurn: 800 tunnels in {took:.1f} s; fds {baseline_fds} -> {fds}, "
        f"RSS +{growth >> 10} KiB"
    )
    assert fds <= baseline_fds + 4
    assert growth < 8 << 20, growth
