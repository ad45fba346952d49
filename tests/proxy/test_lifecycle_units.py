"""The lifecycle's small decisions: the drain timeout option, the connection budget, the gate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.commands.run import _non_negative
from sidecar.fastpath.accept import AcceptGate, connection_limit
from sidecar.fastpath.loops import LoopKind, new_loop


@pytest.mark.parametrize(
    ("text", "expected"), [("0", 0.0), ("20", 20.0), ("2.5", 2.5), (" 7 ", 7.0), ("1e1", 10.0)]
)
def test_drain_timeout_accepts(text: str, expected: float) -> None:
    assert _non_negative(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "x", "nan", "inf", "-inf", "1s", "--2"])
def test_drain_timeout_rejects_naming_the_value(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("\\", "\\\\")):
        _non_negative(text)


@given(st.text(max_size=12))
def test_drain_timeout_is_a_finite_non_negative_number_or_an_error(text: str) -> None:
    try:
        value = _non_negative(text)
    except argparse.ArgumentTypeError:
        return
    assert value >= 0 and math.isfinite(value)


@pytest.mark.parametrize(
    ("soft", "open_now", "expected"),
    [
        (1024, 20, (1024 - 20 - 64) // 2),  # headroom 64
        (160, 15, (160 - 15 - 64) // 2),
        (1_048_576, 30, (1_048_576 - 30 - 65_536) // 2),  # headroom soft/16
        (64, 20, 1),  # never zero: the proxy must accept something
    ],
)
def test_connection_limit_keeps_headroom(soft: int, open_now: int, expected: int) -> None:
    assert connection_limit(soft, open_now) == expected


@given(st.integers(16, 2**21), st.integers(0, 200))
def test_connection_limit_leaves_room_for_its_upstreams(soft: int, open_now: int) -> None:
    limit = connection_limit(soft, open_now)
    assert limit >= 1
    if soft - open_now >= 2 * 64 + 2:
        # client + upstream for each, and at least 64 descriptors never used by the proxy
        assert open_now + 2 * limit + 64 <= soft


def test_the_gate_logs_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    gate = AcceptGate(1, log_interval=3600)
    resumed: list[int] = []
    with caplog.at_level(logging.WARNING, logger="sidecar.proxy.listeners"):
        slot = gate.admit()
        for n in range(1000):
            gate.park(lambda n=n: resumed.append(n))  # type: ignore[misc]
        assert len(caplog.records) == 1
        assert caplog.records[0].times == 1  # type: ignore[attr-defined]
    slot.release()
    slot.release()  # once only
    assert gate.open == 0 and len(resumed) == 1000


@pytest.mark.parametrize("kind", list(LoopKind))
def test_the_gated_loop_accepts_no_more_than_the_limit_and_resumes(kind: LoopKind) -> None:
    """asyncio.start_server on either gated loop: two admitted, the third waits, then gets in."""

    async def scenario() -> list[int]:
        order: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(1)
            order.append(data[0])
            writer.write(data)
            await writer.drain()
            await reader.read()  # until the client closes
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        clients = []
        for n in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            await loop.sock_sendall(sock, bytes([n]))
            clients.append(sock)
        await asyncio.sleep(0.3)
        assert sorted(order) == [0, 1]  # the third waits in the listen queue
        clients[0].close()
        assert await asyncio.wait_for(loop.sock_recv(clients[2], 1), 5) == b"\x02"
        for sock in clients[1:]:
            sock.close()
        for _ in range(100):  # the handlers see EOF and close: every slot is given back
            if gate.open == 0:
                break
            await asyncio.sleep(0.02)
        server.close()
        return order

    gate = AcceptGate(2)
    with asyncio.Runner(loop_factory=lambda: new_loop(kind, gate)) as runner:
        assert runner.run(scenario()) == [0, 1, 2]
    assert gate.open == 0
