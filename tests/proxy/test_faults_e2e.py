"""Faults around a running sidecar, end to end on loopback: upstreams that refuse, reset
mid-response, hang or stream a lot; thousands of idle and slowloris clients; an allowlist file
flipped under load. Each case checks the client gets an answer (or a clean error) in bounded
time, the sidecar lets go of every connection, its memory stays bounded, and it keeps serving.

Where the failure answer is being changed (CONNECT to a refusing upstream: 200 then a closed
tunnel today, 502/504 soon; plain-HTTP failures: our own 502/504), the assertions accept both.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sidecar.policy.parse import digest
from tests.support.faults import FaultyUpstream, RssSampler, open_fds, rss_bytes
from tests.support.sidecar import Sidecar, free_port, start_sidecar
from tests.support.sockets import HEAD_END, recv_head
from tests.support.tls import TestCA
from tests.support.upstream import UpstreamServer

PLAIN, SECURE, CLOSED, WEB, BLOCKED = (
    "127.0.0.6",
    "127.0.0.7",
    "127.0.0.5",
    "127.0.0.3",
    "127.0.0.4",
)
CLOSED_PORT = free_port(CLOSED)  # nothing listens there
STREAM_BYTES = 1 << 30  # 1 GiB each way: plain HTTP and through a TLS tunnel
IDLE = 2000


@dataclass
class World:
    sidecar: Sidecar
    plain: FaultyUpstream  # plain HTTP
    secure: FaultyUpstream  # HTTPS, certificate for secure.test
    web: UpstreamServer
    blocked: UpstreamServer  # reachable, but no rule allows it
    ca_file: Path


def _raise_nofile(wanted: int) -> None:
    """Enough descriptors for thousands of test sockets (the sidecar inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, ca_file: Path
) -> Iterator[World]:
    _raise_nofile(3 * IDLE + 1024)
    tmp = tmp_path_factory.mktemp("faults")
    plain = FaultyUpstream(PLAIN)
    secure = FaultyUpstream(SECURE, tls=test_ca.issue("secure.test").write(tmp, "secure"))
    web = UpstreamServer(WEB, label="web").start()
    blocked = UpstreamServer(BLOCKED, label="blocked").start()
    allowlist = f"""
allow:
  - host: plain.test
    ports: [{plain.port}]
  - host: secure.test
    ports: [{secure.port}]
  - host: refused.test
    ports: [{CLOSED_PORT}]
  - host: web.test
    ports: [{web.port}]
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={
            "plain.test": PLAIN,
            "secure.test": SECURE,
            "refused.test": CLOSED,
            "web.test": WEB,
            "blocked.test": BLOCKED,
        },
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    yield World(sidecar, plain, secure, web, blocked, ca_file)
    # No fault above may surface as an unhandled exception (checked before the shutdown, whose
    # handling of open connections is another matter).
    tracebacks = [line for line in sidecar.stderr if "Traceback" in line]
    code = sidecar.stop()
    for server in (plain, secure):
        server.stop()
    web.stop()
    blocked.stop()
    assert code == 0, sidecar.stderr[-20:]
    assert tracebacks == [], tracebacks


def _still_serves(world: World) -> float:
    """A fresh request through the sidecar succeeds; returns how long it took."""
    started = time.monotonic()
    r = requests.get(
        f"http://web.test:{world.web.port}/ok",
        proxies={"http": world.sidecar.proxy_url},
        timeout=5,
    )
    assert r.status_code == 200 and r.json()["upstream"] == "web"
    return time.monotonic() - started


def _settled_fds(pid: int, baseline: int, slack: int = 8, timeout: float = 10.0) -> int:
    """The sidecar's open descriptors once they are back near ``baseline`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while (fds := open_fds(pid)) > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.1)
    return fds


def _tunnel(world: World, authority: str, timeout: float = 5.0) -> ssl.SSLSocket:
    sock, head = world.sidecar.connect_tunnel(authority)
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.settimeout(timeout)
    context = ssl.create_default_context(cafile=str(world.ca_file))
    return context.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0])


def _read_all(sock: socket.socket, limit: float) -> tuple[int, BaseException | None]:
    """Read until EOF, an error or ``limit`` seconds; returns bytes read and the error."""
    buf = bytearray(1 << 20)
    total = 0
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            n = sock.recv_into(buf)
            if not n:
                return total, None
            total += n
    except (OSError, ssl.SSLError) as err:
        return total, err
    raise AssertionError(f"still reading after {limit} s ({total} bytes)")


# -- upstream refuses ---------------------------------------------------------------------------


def test_a_refusing_upstream_fails_the_plain_request_promptly(world: World) -> None:
    started = time.monotonic()
    try:
        r = requests.get(
            f"http://refused.test:{CLOSED_PORT}/x",
            proxies={"http": world.sidecar.proxy_url},
            timeout=10,
        )
        outcome: int | str = r.status_code
    except requests.ConnectionError as err:
        outcome = type(err).__name__
    took = time.monotonic() - started
    # mitmproxy's 502 today, the sidecar's own 502 with x-egress-reason soon: a 5xx either way.
    assert isinstance(outcome, str) or 500 <= outcome < 600, outcome
    assert took < 3, took
    _still_serves(world)


def test_a_refusing_upstream_fails_the_tunnel_promptly(world: World) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "8",
            "-x",
            world.sidecar.proxy_url,
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            f"https://refused.test:{CLOSED_PORT}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    took = time.monotonic() - started
    # Today: 200 to the CONNECT, then the tunnel closes (curl: TLS error, exit 35);
    # with the CONNECT answered after the upstream connect: 502 (curl exit 56). Never a hang.
    assert out.returncode not in (0, 28), (out.returncode, out.stderr)
    assert out.stdout in ("200", "502", "503", "504"), out.stdout
    assert took < 5, took
    _still_serves(world)


# -- upstream resets mid-response ----------------------------------------------------------------


def test_a_reset_mid_response_reaches_the_plain_client_as_an_error(world: World) -> None:
    pid = world.sidecar.proc.pid
    baseline = open_fds(pid)
    sock = socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=5)
    target = f"http://plain.test:{world.plain.port}/reset/100000"
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: plain.test:{world.plain.port}\r\n\r\n".encode())
    started = time.monotonic()
    got, err = _read_all(sock, limit=5)
    sock.close()
    # The upstream promised 1 GiB and sent 100 kB: the client must see the stream end short
    # (EOF or reset), never a hang and never a body passed off as complete.
    assert 0 < got < 200_000, got
    assert time.monotonic() - started < 5
    print(f"\nplain reset: client got {got} bytes then {err or 'EOF'}")
    assert world.plain.live.wait_open(0, timeout=5) == 0
    assert _settled_fds(pid, baseline) <= baseline + 8
    _still_serves(world)


def test_a_reset_mid_response_inside_a_tunnel_reaches_the_client(world: World) -> None:
    tls = _tunnel(world, f"secure.test:{world.secure.port}")
    tls.sendall(b"GET /reset/100000 HTTP/1.1\r\nHost: secure.test\r\n\r\n")
    started = time.monotonic()
    got, err = _read_all(tls, limit=5)
    tls.close()
    assert 0 < got < 200_000, got
    assert time.monotonic() - started < 5
    print(f"\ntunnel reset: client got {got} bytes then {err or 'EOF'}")
    assert world.secure.live.wait_open(0, timeout=5) == 0
    _still_serves(world)


# -- upstream hangs -----------------------------------------------------------------------------


def test_a_client_giving_up_on_a_hanging_upstream_releases_its_connection(world: World) -> None:
    pid = world.sidecar.proc.pid
    baseline = open_fds(pid)
    accepted = world.plain.live.accepted
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        requests.get(
            f"http://plain.test:{world.plain.port}/hang",
            proxies={"http": world.sidecar.proxy_url},
            timeout=(5, 1.5),
        )
    assert time.monotonic() - started < 4
    assert world.plain.live.accepted == accepted + 1  # the request did reach the upstream
    # The client is gone: the sidecar closes its upstream connection too, and keeps no socket.
    assert world.plain.live.wait_open(0, timeout=5) == 0
    assert _settled_fds(pid, baseline) <= baseline + 8
    _still_serves(world)


def test_a_client_closing_a_tunnel_to_a_hanging_upstream_releases_it(world: World) -> None:
    tls = _tunnel(world, f"secure.test:{world.secure.port}", timeout=1.0)
    tls.sendall(b"GET /hang HTTP/1.1\r\nHost: secure.test\r\n\r\n")
    with pytest.raises(TimeoutError):
        tls.recv(1)
    assert world.secure.live.open == 1
    tls.close()
    assert world.secure.live.wait_open(0, timeout=5) == 0
    _still_serves(world)


# -- a large stream ------------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["plain-http", "tls-tunnel"])
def test_a_large_stream_passes_whole_with_bounded_memory(world: World, through: str) -> None:
    sampler = RssSampler(world.sidecar.proc.pid)
    started = time.monotonic()
    if through == "plain-http":
        sock: socket.socket = socket.create_connection(
            ("127.0.0.1", world.sidecar.explicit_port), timeout=10
        )
        url = f"http://plain.test:{world.plain.port}/stream/{STREAM_BYTES}"
        sock.sendall(
            f"GET {url} HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n".encode()
        )
    else:
        sock = _tunnel(world, f"secure.test:{world.secure.port}", timeout=10)
        sock.sendall(f"GET /stream/{STREAM_BYTES} HTTP/1.1\r\nHost: secure.test\r\n\r\n".encode())
    head = recv_head(sock, bufsize=4096)
    assert HEAD_END in head, head
    head, _, body_start = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    buf = bytearray(1 << 20)
    got = len(body_start)
    while got < STREAM_BYTES:
        n = sock.recv_into(buf)
        assert n, f"stream ended after {got} of {STREAM_BYTES} bytes"
        got += n
    took = time.monotonic() - started
    sock.close()
    peak = sampler.stop()
    growth = peak - sampler.start
    print(
        f"\n{through}: {STREAM_BYTES >> 20} MiB in {took:.1f} s "
        f"({STREAM_BYTES / took / 1e6:.0f} MB/s), sidecar RSS {sampler.start >> 20} MiB "
        f"-> peak {peak >> 20} MiB (+{growth >> 20} MiB)"
    )
    assert got == STREAM_BYTES
    assert growth < 64 << 20, growth  # streamed, never buffered
    _still_serves(world)


def test_distinct_long_request_targets_do_not_grow_memory(world: World) -> None:
    """3,000 keep-alive requests, each to its own 6 KB path: what the proxy keeps per
    destination (its readings of a target, its decisions) is not kept for such keys, so RSS
    stays put (before the bound on key length: +37.5 MiB for these, +58 MiB for 4,500 of 7 KB)."""
    pid = world.sidecar.proc.pid
    before = rss_bytes(pid)
    sock = socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=10)
    reader = sock.makefile("rb")
    statuses = set()
    try:
        for n in range(3000):
            path = f"/{n}/" + "p" * 6000
            sock.sendall(
                f"GET http://web.test:{world.web.port}{path} HTTP/1.1\r\n"
                f"Host: web.test:{world.web.port}\r\n\r\n".encode()
            )
            statuses.add(reader.readline().split(b" ")[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    finally:
        reader.close()
        sock.close()
    growth = rss_bytes(pid) - before
    assert statuses == {b"200"}
    assert growth < 12 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"


# -- idle connections and slowloris --------------------------------------------------------------


def accepted_clients(pid: int, port: int) -> int:
    """Established connections to the sidecar's ``port`` whose socket the sidecar holds: its
    descriptor count alone also moves with its pooled upstream connections coming and going."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                held.add(link[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in held:
                count += 1
    return count


def test_thousands_of_idle_connections_cost_little_and_block_nobody(world: World) -> None:
    pid, port = world.sidecar.proc.pid, world.sidecar.explicit_port
    fds0, rss0 = open_fds(pid), rss_bytes(pid)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while len(idle) < IDLE and time.monotonic() < deadline:
            # In batches well inside the listen queue (backlog 1024): a burst beyond it costs
            # 1 s SYN retransmits, which would only slow the test down.
            for _ in range(50):
                idle.append(socket.create_connection(("127.0.0.1", port), 5))
            while accepted_clients(pid, port) < len(idle) and time.monotonic() < deadline:
                time.sleep(0.01)
        # Every connection accepted by the sidecar and held (one descriptor each)...
        held, rss1 = accepted_clients(pid, port), rss_bytes(pid)
        assert held >= IDLE, (held, fds0, open_fds(pid))
        # ...and a new client is still served at once.
        took = _still_serves(world)
        per_connection = (rss1 - rss0) / IDLE
        print(
            f"\n{IDLE} idle connections: RSS {rss0 >> 20} -> {rss1 >> 20} MiB "
            f"({per_connection / 1024:.1f} KiB each), a new request took {took * 1000:.0f} ms"
        )
        assert per_connection < 64 * 1024, per_connection
        assert took < 2, took
    finally:
        for sock in idle:
            sock.close()
    assert _settled_fds(pid, fds0, timeout=20) <= fds0 + 8  # all of them let go


def test_slowloris_clients_do_not_hold_up_others(world: World) -> None:
    pid = world.sidecar.proc.pid
    fds0 = open_fds(pid)
    slow = [
        socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), 5) for _ in range(200)
    ]
    head = f"GET http://web.test:{world.web.port}/slow HTTP/1.1\r\nHost: web.test\r\n".encode()
    latencies: list[float] = []
    try:
        for sock in slow:
            sock.setblocking(False)
        # Each slow client sends one more byte of a head that never ends, every 0.1 s, while
        # normal requests go through the same listener.
        for i in range(30):
            for sock in slow:
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.send(head[i % len(head) : i % len(head) + 1] if i < len(head) else b"X")
            latencies.append(_still_serves(world))
            time.sleep(0.1)
    finally:
        for sock in slow:
            sock.close()
    print(f"\nslowloris x{len(slow)}: normal requests max {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 2, latencies
    assert _settled_fds(pid, fds0, timeout=20) <= fds0 + 8


# -- the allowlist file flipped under load --------------------------------------------------------

VERSION_A = "allow:\n  - both.test:{port}\n  - only-a.test:{port}\n"
VERSION_B = (
    "allow:\n  - host: both.test\n    ports: [{port}]\n  - host: only-b.test\n    ports: [{port}]\n"
)


def test_file_flips_under_load_give_no_wrong_decision(
    tmp_path: Path, world: World, seconds: float = 8.0
) -> None:
    """Clients keep calling while the allowlist file is replaced (atomic rename) every 0.2 s:
    each decision must be right for the version it names, and both.test never refused."""
    port = world.web.port
    docs = {"A": VERSION_A.format(port=port), "B": VERSION_B.format(port=port)}
    kind_of = {digest(text): kind for kind, text in docs.items()}
    sidecar = start_sidecar(
        tmp_path,
        allowlist=docs["A"],
        hosts={"both.test": WEB, "only-a.test": WEB, "only-b.test": WEB},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    path = tmp_path / "allowlist.yaml"
    stop = threading.Event()
    flips = [0]
    results: list[tuple[str, str, int]] = []  # (url, host, status)
    lock = threading.Lock()
    t_end = time.monotonic() + seconds

    def flipper() -> None:
        kind = "A"
        while not stop.wait(0.2) and time.monotonic() < t_end:
            kind = "B" if kind == "A" else "A"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(docs[kind])
            os.replace(tmp, path)
            flips[0] += 1

    def client(n: int) -> None:
        session = requests.Session()
        session.proxies = {"http": sidecar.proxy_url}
        hosts = ("both.test", "only-a.test", "only-b.test")
        i = 0
        while time.monotonic() < t_end and i < 50_000:
            host = hosts[(i + n) % 3]
            url = f"http://{host}:{port}/c{n}/{i}"
            i += 1
            try:
                status = session.get(url, timeout=10).status_code
            except requests.RequestException:
                status = 0
            with lock:
                results.append((url, host, status))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(3)]
    threads.append(threading.Thread(target=flipper, daemon=True))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
        stop.set()
        assert not any(t.is_alive() for t in threads)
        # Decision lines leave in batches (every ~20 ms): wait for the last ones, bounded.
        wanted = {url for url, _, _ in results}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            decisions = {d["url"]: d for d in sidecar.decisions() if d.get("url")}
            if wanted <= decisions.keys():
                break
            time.sleep(0.1)
    finally:
        code = sidecar.stop()
    wrong: list[str] = []
    for url, host, status in results:
        d = decisions.get(url)
        kind = kind_of.get(d["policy_version"]) if d else None
        if d is None or kind is None:
            wrong.append(f"{url}: status {status}, decision {d}")
            continue
        allowed = host in ("both.test", f"only-{kind.lower()}.test")
        if (d["decision"] == "allow") != allowed or (status == 200) != allowed:
            wrong.append(f"{url}: {d['decision']} ({status}) under version {kind}")
    versions = {d["policy_version"] for d in decisions.values()}
    print(
        f"\nfile flips: {len(results)} requests, {flips[0]} flips, "
        f"{len(versions)} versions decided, wrong decisions: {len(wrong)}"
    )
    assert code == 0
    assert wrong == [], wrong[:10]
    assert flips[0] >= 20 and len(results) > 200
    assert versions == set(kind_of)  # both versions were in force during the run


# -- hostile request heads: userinfo tricks and smuggling ------------------------------------------

# {w}: web.test:PORT (allowed), {b}: blocked.test:PORT (no rule allows it). Each head tries to
# get a request to blocked.test, or one the proxy never decided ("smuggled"), past the proxy.
HOSTILE = {
    "userinfo-names-allowed": "GET http://{w}@{b}/smuggled HTTP/1.1\r\nHost: {b}\r\n\r\n",
    "userinfo-backslash": "GET http://{w}\\@{b}/smuggled HTTP/1.1\r\nHost: {w}\r\n\r\n",
    "fragment-before-at": "GET http://{b}#@{w}/smuggled HTTP/1.1\r\nHost: {w}\r\n\r\n",
    "te-cl": (
        "POST http://{w}/ HTTP/1.1\r\nHost: {w}\r\nContent-Length: {n}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
    ),
    "cl-te-obfuscated": (
        "POST http://{w}/ HTTP/1.1\r\nHost: {w}\r\nContent-Length: {n}\r\n"
        "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{hidden}"
    ),
    "cl-cl": (
        "POST http://{w}/ HTTP/1.1\r\nHost: {w}\r\nContent-Length: 5\r\n"
        "Content-Length: {n}\r\n\r\n0\r\n\r\n{hidden}"
    ),
    "pipelined-denied": "GET http://{w}/ok HTTP/1.1\r\nHost: {w}\r\n\r\n{hidden}",
    "origin-form-host-blocked": "GET /smuggled HTTP/1.1\r\nHost: {b}\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_heads_never_reach_an_undecided_destination(world: World, case: str) -> None:
    w, b = f"web.test:{world.web.port}", f"blocked.test:{world.blocked.port}"
    hidden = f"GET http://{b}/smuggled HTTP/1.1\r\nHost: {b}\r\nConnection: close\r\n\r\n"
    text = HOSTILE[case].format(w=w, b=b, hidden=hidden, n=len("0\r\n\r\n") + len(hidden))
    blocked_before = world.blocked.seen.connections
    sock = socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=3)
    sock.sendall(text.encode())
    answer = b""
    with contextlib.suppress(OSError):  # a reset or the 3 s timeout ends the conversation
        while chunk := sock.recv(65536):
            answer += chunk
    sock.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    print(f"\n{case}: {[s.decode() for s in statuses]}")
    assert statuses, answer[:200]  # answered (refused, denied or served), never left hanging
    assert world.blocked.seen.connections == blocked_before
    assert not [r for r in world.web.seen.requests if "smuggled" in r["path"]]
    _still_serves(world)
