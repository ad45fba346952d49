"""Review of issue 8 item 6 on the explicit listener: domain fronting behind a leading record.

A tunnel's first flight that opened with a TLS record other than a handshake (a warning alert,
a change_cipher_spec) was taken for "not TLS" and relayed on the CONNECT host's decision,
although a ClientHello naming another host followed it. Now it is refused like any unreadable
ClientHello, and the upstream (a recorder of every byte) receives nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.proxy.test_tunnels_e2e import Recorder, client_hello, read_until_closed
from tests.support.sidecar import Sidecar, start_sidecar

REC = "127.0.0.23"


@dataclass
class World:
    sidecar: Sidecar
    rec: Recorder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    rec = Recorder(REC).start()
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("review-tunnels"),
        allowlist=f"allow:\n  - host: rec.test\n    ports: [{rec.port}]\n",
        hosts={"rec.test": REC},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    yield World(sidecar, rec)
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    rec.stop()


@pytest.mark.parametrize(
    "prefix",
    [b"\x15\x03\x01\x00\x02\x01\x5a", b"\x14\x03\x01\x00\x01\x01", b"\x17\x03\x03\x00\x01\x00"],
    ids=["warning-alert", "change-cipher-spec", "application-data"],
)
def test_a_fronted_clienthello_behind_another_record_is_refused(
    world: World, prefix: bytes
) -> None:
    mark = world.rec.mark()
    sock, head = world.sidecar.connect_tunnel(f"rec.test:{world.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(prefix + client_hello("evil.example"))
    assert read_until_closed(sock) == b""  # closed by the proxy
    sock.close()
    (conn,) = world.rec.closed_since(mark)
    assert conn.closed and conn.received == b"", conn
    line = world.sidecar.wait_decisions(
        lambda d: d.get("host") == "rec.test" and d["decision"] == "deny"
    )[-1]
    assert line["reason"] == "unreadable first flight"


def test_a_plain_clienthello_and_non_tls_bytes_still_pass(world: World) -> None:
    """What is not TLS is decided by the CONNECT host at once (no wait for a line end)."""
    for first in (client_hello("rec.test"), b"hello"):
        mark = world.rec.mark()
        sock, head = world.sidecar.connect_tunnel(f"rec.test:{world.rec.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        try:
            sock.sendall(first)
            assert world.rec.wait_received(mark, first) == first
        finally:
            sock.close()


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    rec = Recorder("127.0.0.24").start()
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("review-tunnels-audit"),
        allowlist=f"mode: audit\nallow:\n  - host: rec.test\n    ports: [{rec.port}]\n",
        hosts={"rec.test": "127.0.0.24"},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    yield World(sidecar, rec)
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    rec.stop()


def test_in_audit_mode_a_mismatch_is_audited_and_an_unreadable_hello_refused(
    audit: World,
) -> None:
    """The record says what happened: audit lets a mismatched SNI through (and says "audit"); an
    unreadable first flight cannot be decided, so it is refused and recorded as a deny."""
    mark = audit.rec.mark()
    sock, head = audit.sidecar.connect_tunnel(f"rec.test:{audit.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    hello = client_hello("evil.example")
    try:
        sock.sendall(hello)
        assert audit.rec.wait_received(mark, hello) == hello
    finally:
        sock.close()
    line = audit.sidecar.wait_decisions(lambda d: d.get("reason") == "sni mismatch")[-1]
    assert line["decision"] == "audit"

    mark = audit.rec.mark()
    sock, head = audit.sidecar.connect_tunnel(f"rec.test:{audit.rec.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(b"\x15\x03\x01\x00\x02\x01\x5a" + client_hello("evil.example"))
    assert read_until_closed(sock) == b""
    sock.close()
    (conn,) = audit.rec.closed_since(mark)
    assert conn.received == b""
    line = audit.sidecar.wait_decisions(lambda d: d.get("reason") == "unreadable first flight")[-1]
    assert line["decision"] == "deny"
