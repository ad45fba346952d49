"""The event loops the sidecar runs on (sidecar.fastpath.loops): uvloop by default, asyncio's
selector loop on request; both gate their accepts and connect upstreams alike."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.fastpath.accept import AcceptGate, GatedEventLoop
from sidecar.fastpath.gated_server import GatedServer, Lane
from sidecar.fastpath.loops import LoopKind, new_loop
from sidecar.fastpath.upstream import UpstreamError, dial
from tests.support.sidecar import free_ports


def run_on[T](kind: LoopKind, scenario: Callable[[], Awaitable[T]], limit: int = 100) -> T:
    with asyncio.Runner(loop_factory=lambda: new_loop(kind, AcceptGate(limit))) as runner:
        return runner.run(scenario())  # type: ignore[arg-type]


def test_the_kinds_are_the_loops_named() -> None:
    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__mro__[1].__module__

    assert run_on(LoopKind.UVLOOP, loop_type) == "uvloop"
    assert isinstance(new_loop(LoopKind.ASYNCIO, AcceptGate(1)), GatedEventLoop)


def test_uvloop_servers_are_gated_servers_listening_with_the_backlog_asked() -> None:
    async def scenario() -> tuple[Any, ...]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, backlog=7)
        sock = server.sockets[0]
        state = (
            type(server),
            server.is_serving(),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        )
        server.close()
        await server.wait_closed()
        return (*state, server.is_serving(), sock.fileno())

    assert run_on(LoopKind.UVLOOP, scenario) == (GatedServer, True, 1, 1, False, -1)


def test_a_server_made_without_serving_accepts_nothing_until_started() -> None:
    async def scenario() -> list[bytes]:
        got: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.append(await reader.read(1))
            writer.close()

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(), handle),
            "127.0.0.1",
            0,
            start_serving=False,
        )
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))  # queued by the kernel
        client.sendall(b"x")
        await asyncio.sleep(0.2)
        before = list(got)
        await server.start_serving()
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        client.close()
        server.close()
        return [*before, b"|", *got]

    assert run_on(LoopKind.UVLOOP, scenario) == [b"|", b"x"]


def test_a_port_in_use_is_named_in_the_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]

    async def scenario() -> None:
        await asyncio.start_server(lambda r, w: None, "127.0.0.1", port, reuse_address=False)

    try:
        with pytest.raises(OSError, match=rf"127\.0\.0\.1', {port}\): .*in use"):
            run_on(LoopKind.UVLOOP, scenario)
    finally:
        holder.close()


def test_an_ipv6_listener_is_v6_only() -> None:
    async def scenario() -> int:
        server = await asyncio.start_server(lambda r, w: None, "::1", 0)
        only = server.sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        server.close()
        return only

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.fail("this machine has no IPv6 loopback: the listener cannot be tested")
    assert run_on(LoopKind.UVLOOP, scenario) == 1


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", list(LoopKind))
def test_dial_connects_and_the_protocol_is_made_first(kind: LoopKind) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    async def scenario() -> tuple[bool, bool]:
        transport, protocol = await dial("127.0.0.1", port, _Echo, 5.0)
        made = protocol.transport is transport
        peer = transport.get_extra_info("peername") == ("127.0.0.1", port)
        transport.close()
        return made, peer

    try:
        assert run_on(kind, scenario) == (True, True)
    finally:
        upstream.close()


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (LoopKind.ASYNCIO, "[Errno 111] Connect call failed ('127.0.0.1', {port})"),
        (LoopKind.UVLOOP, "[Errno 111] Connection refused"),
    ],
)
def test_a_refused_dial_says_so_in_the_loops_words(kind: LoopKind, words: str) -> None:
    """Each loop's own wording, as mitmproxy's connects on that loop say it (the engines are
    compared line for line); the error type is the same."""
    (port,) = free_ports(1)  # nothing listens there

    async def scenario() -> UpstreamError:
        with pytest.raises(UpstreamError) as caught:
            await dial("127.0.0.1", port, asyncio.Protocol, 5.0)
        return caught.value

    err = run_on(kind, scenario)
    assert err.message == words.format(port=port)
    assert err.error_type == "connection_refused"


@pytest.mark.parametrize("kind", list(LoopKind))
def test_a_dial_that_gets_no_answer_times_out_on_either_loop(kind: LoopKind) -> None:
    # A listener whose queue is full: the kernel drops further SYNs, the connect hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)

    async def scenario() -> tuple[str, float]:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await dial("127.0.0.1", port, asyncio.Protocol, 0.3)
        return caught.value.message, time.monotonic() - started

    try:
        message, took = run_on(kind, scenario)
    finally:
        for sock in [full, *fillers]:
            sock.close()
    assert message == "connect timed out after 0.3 s"
    assert 0.25 < took < 3.0


@pytest.mark.parametrize("kind", list(LoopKind))
def test_a_cancelled_dial_leaves_no_descriptor_and_closes_nothing_else(kind: LoopKind) -> None:
    """The uvloop #645 pattern: connects cancelled while pending, then new connections that may
    reuse the numbers must keep working (a double close would cut them)."""
    upstream = socket.create_server(("127.0.0.1", 0), backlog=256)
    port = upstream.getsockname()[1]

    async def scenario() -> tuple[int, int]:
        import os

        warm, _ = await dial("127.0.0.1", port, _Echo, 5.0)  # the loop's own lazy descriptors
        warm.close()
        await asyncio.sleep(0.1)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(200):
            task = asyncio.ensure_future(dial("127.0.0.1", port, _Echo, 5.0))
            await asyncio.sleep(0)
            task.cancel()
            try:
                transport, _ = await task
            except asyncio.CancelledError:
                pass
            else:
                transport.close()
        await asyncio.sleep(0.2)
        survivors = []
        for _ in range(20):
            transport, _ = await dial("127.0.0.1", port, _Echo, 5.0)
            survivors.append(transport)
        for _ in range(20):  # accepted by the kernel and held there; cancelled ones drained
            await asyncio.sleep(0)
        alive = sum(not t.is_closing() for t in survivors)
        for t in survivors:
            t.close()
        await asyncio.sleep(0.2)
        return alive, len(os.listdir("/proc/self/fd")) - before

    try:
        alive, extra_fds = run_on(kind, scenario)
    finally:
        upstream.close()
    assert alive == 20
    assert extra_fds <= 0


def test_the_uvloop_in_use_detaches_a_socket_whose_connect_was_cancelled() -> None:
    """uvloop before 0.23 closed the descriptor of a cancelled create_connection(sock=) but left
    it in the socket, whose later close hit whichever connection had reused the number: in a
    CONNECT churn here 0.21 aborted in libuv's epoll_ctl and handed one client another's bytes
    (uvloop #645, #738). The requirement pins the fix; this fails on a version without it."""
    upstream = socket.create_server(("127.0.0.1", 0), backlog=256)
    port = upstream.getsockname()[1]

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        left = []
        for _ in range(20):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            task = loop.create_task(loop.create_connection(asyncio.Protocol, sock=sock))
            await asyncio.sleep(0)  # inside: waiting for connection_made
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            left.append(sock.fileno())
        return left

    try:
        assert run_on(LoopKind.UVLOOP, scenario) == [-1] * 20
    finally:
        upstream.close()


# -- the native lane: uvloop's own server while the gate has room ---------------------------


class _Counted(asyncio.Protocol):
    """Echoes, and closes on the client's EOF; counts connections made and open."""

    made = 0
    open = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).made += 1
        type(self).open += 1
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).open -= 1


async def _until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"ping")
        return client.recv(4)


def test_with_room_a_uvloop_server_accepts_in_the_loops_own_lane() -> None:
    gate = AcceptGate(100_000)

    async def scenario() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Counted, "127.0.0.1", 0, backlog=16)
        assert isinstance(server, GatedServer)
        native = await _until(lambda: server.lane is Lane.NATIVE)
        port = server.sockets[0].getsockname()[1]
        echoed = await asyncio.to_thread(_echo, port)
        counted = await _until(lambda: gate.open == 0)  # the slot came back with the close
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # the loop's server closes its duplicate on the next turn
        refused = False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            refused = True
        return native, echoed, counted, server.lane, refused, server.sockets

    _Counted.made = _Counted.open = 0
    with asyncio.Runner(loop_factory=lambda: new_loop(LoopKind.UVLOOP, gate)) as runner:
        assert runner.run(scenario()) == (True, b"ping", True, Lane.GATED, True, ())
    assert _Counted.made == 1 and gate.open == 0


def test_the_native_lane_is_left_within_the_reserve_and_the_limit_still_holds() -> None:
    """Backlog 4: a reserve of 8 (two queues). Limit 30: native at first, gated from 22 open
    on, 30 served and the rest queued; native again once the room is above 16."""
    gate = AcceptGate(30)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Counted, "127.0.0.1", 0, backlog=4)
        assert isinstance(server, GatedServer)
        seen: list[Any] = [await _until(lambda: server.lane is Lane.NATIVE)]
        port = server.sockets[0].getsockname()[1]

        async def connect() -> socket.socket:
            return await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 5)

        clients = []
        lanes = []
        for n in range(34):  # four past the limit: they fit the listen queue (backlog + 1)
            clients.append(await connect())
            want = min(n + 1, 30)
            await _until(lambda: _Counted.made == want, 2.0)  # noqa: B023 (awaited here)
            lanes.append(server.lane)
        await asyncio.sleep(0.3)  # nothing more gets in
        seen += [_Counted.made, gate.open, lanes.index(Lane.GATED), lanes[-1]]
        for client in clients[:10]:
            client.close()  # the four queued ones get in as these go, at a room of 10
        seen += [await _until(lambda: _Counted.made == 34 and _Counted.open == 24), server.lane]
        for client in clients[10:20]:
            client.close()
        await _until(lambda: _Counted.open == 14)
        clients.append(await connect())  # accepted at a room of 16: not above it
        seen += [await _until(lambda: _Counted.made == 35), server.lane]
        for client in clients[20:30]:
            client.close()
        await _until(lambda: _Counted.open == 5)
        clients.append(await connect())  # accepted at a room of 25: native again
        seen += [await _until(lambda: server.lane is Lane.NATIVE)]
        seen.append(await asyncio.to_thread(_echo, port))
        for client in clients:
            client.close()
        seen.append(await _until(lambda: gate.open == 0))
        server.close()
        return seen

    _Counted.made = _Counted.open = 0
    with asyncio.Runner(loop_factory=lambda: new_loop(LoopKind.UVLOOP, gate)) as runner:
        # lanes.index: the 22nd connection (index 21) left the room at 8
        assert runner.run(scenario()) == [
            True, 30, 30, 21, Lane.GATED, True, Lane.GATED, True, Lane.GATED, True, b"ping",
            True,
        ]  # fmt: skip


_OUT_OF_FDS_SERVER = """
import asyncio, logging, os, resource, signal, sys
from sidecar.fastpath.accept import AcceptGate
from sidecar.fastpath.loops import LoopKind, new_loop

logging.basicConfig(stream=sys.stderr, format="%(message)s")
gate = AcceptGate(100_000)  # far more than the descriptors: only the native lane's reserve is
                            # in the way, as when something else uses up the descriptors


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False


async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=64)
    while server.lane != "native":
        await asyncio.sleep(0.01)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, used + 20))
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(server.lane, flush=True)  # its lane when told to stop


with asyncio.Runner(loop_factory=lambda: new_loop(LoopKind.UVLOOP, gate)) as runner:
    runner.run(main())
"""


def test_out_of_descriptors_in_the_native_lane_libuv_sheds_and_the_listener_lives_on() -> None:
    """Descriptors used up by something the gate does not count (its headroom is what keeps
    this away): libuv accepts and closes what is queued (its EMFILE reserve trick) instead of
    leaving it queued as the gated lane would, and its listener goes on; once descriptors are
    free, new connections are served in the native lane."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _OUT_OF_FDS_SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(40):  # past the server's 20 free descriptors
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        shed = 0
        for client in clients:
            client.settimeout(2)
            try:
                client.sendall(b"x")
                shed += client.recv(1) == b""
            except OSError:
                shed += 1
        for client in clients:
            client.close()
        # The server's side of each closes on EOF: descriptors free, the native lane accepts.
        deadline = time.monotonic() + 10
        answer = b""
        while answer != b"ping" and time.monotonic() < deadline:
            try:
                answer = _echo(port)
            except OSError:
                time.sleep(0.2)
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        out, stderr = proc.communicate(timeout=10)
    assert (answer, out.strip(), proc.returncode) == (b"ping", "native", 0), stderr
    assert 10 <= shed <= 30, shed  # some served within the 20 descriptors, the rest shed


def test_a_native_listener_the_loop_closed_is_taken_over_by_the_gated_lane(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvloop closes a listener whose accept failed for another reason than EAGAIN or EMFILE
    (ENOBUFS, ENOMEM, EMFILE with libuv's reserve gone) without a word: the watchdog sees its
    socket gone within a second and the gated lane accepts from then on."""
    gate = AcceptGate(100_000)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Counted, "127.0.0.1", 0)
        assert isinstance(server, GatedServer)
        seen: list[Any] = [await _until(lambda: server.lane is Lane.NATIVE)]
        port = server.sockets[0].getsockname()[1]
        for native in server._native_servers:  # as uvloop's _fatal_error closes its handle
            native.close()
        seen.append(await _until(lambda: server.lane is Lane.GATED, 3.0))
        seen.append(await asyncio.to_thread(_echo, port))
        await asyncio.sleep(0.2)
        seen.append(server.lane)  # for good: no way back to a lane that failed
        server.close()
        return seen

    _Counted.made = _Counted.open = 0
    with asyncio.Runner(loop_factory=lambda: new_loop(LoopKind.UVLOOP, gate)) as runner:
        assert runner.run(scenario()) == [True, True, b"ping", Lane.GATED]
    assert any("closed a listener after a failed accept" in r.message for r in caplog.records)
