"""Review of issue 8 item 11 on the explicit listener: a Host header is read by the one authority
parser too. A Host that `check` would refuse gets 400 invalid destination (RFC 9112 3.2), in
origin form and beside an absolute-form target alike; nothing reaches the upstream."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer

WEB = "127.0.0.27"


@dataclass
class World:
    sidecar: Sidecar
    web: UpstreamServer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    web = UpstreamServer(WEB).start()
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("review-host"),
        allowlist=f"allow:\n  - host: web.test\n    ports: [{web.server_port}]\n",
        hosts={"web.test": WEB},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    yield World(sidecar, web)
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    web.stop()


def _exchange(world: World, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=5) as s:
        s.sendall(head.encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("target", ["/x", "http://web.test:{port}/x"], ids=["origin", "absolute"])
@pytest.mark.parametrize(
    "host", ["web.test:", "web.test:abc", "u@web.test:{port}", "web.test:{port}:{port}"]
)
def test_a_host_header_check_would_refuse_gets_400(world: World, target: str, host: str) -> None:
    port = world.web.server_port
    before = len(world.web.seen.requests)
    head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    answer = _exchange(world, head.format(port=port))
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"x-egress-reason: invalid destination" in answer.lower()
    assert len(world.web.seen.requests) == before


def test_a_valid_host_still_passes(world: World) -> None:
    port = world.web.server_port
    head = f"GET /x HTTP/1.1\r\nHost: WEB.test.:{port}\r\nConnection: close\r\n\r\n"
    assert _exchange(world, head).startswith(b"HTTP/1.1 200")
