"""`check` and the running proxy read a request-target the same way.

Each target is sent raw over a socket to the sidecar's explicit port, as an absolute-form
request line, and given to `egress-sidecar check`: 400 from the proxy must be exit 2 from
check (bad input), 403 exit 1 (deny), an upstream's 200 exit 0 (allow).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.cli import main
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.sockets import recv_head
from tests.support.upstream import UpstreamServer

ALLOWED, EVIL = "127.0.0.6", "127.0.0.7"


@dataclass
class World:
    sidecar: Sidecar
    port: int  # the upstream's, allowed for allowed.test
    allowlist: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("check-vs-proxy")
    upstream = UpstreamServer(ALLOWED, label="allowed").start()
    evil = UpstreamServer(EVIL, label="evil", port=upstream.port).start()
    allowlist = f"allow:\n  - host: allowed.test\n    ports: [{upstream.port}]\n"
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={"allowed.test": ALLOWED, "evil.test": EVIL},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    try:
        yield World(sidecar, upstream.port, tmp / "allowlist.yaml")
    finally:
        sidecar.stop()
        upstream.stop()
        evil.stop()


def proxy_status(world: World, target: str) -> int:
    with socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=10) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".encode()
        )
        head = recv_head(s, b"\r\n", bufsize=4096)
    return int(head.split(b" ", 2)[1])


def check_exit(world: World, target: str) -> int:
    return main(
        [
            "check",
            "--allowlist-file",
            str(world.allowlist),
            "--allow-private-range",
            "127.0.0.0/8",
            target,
        ]
    )


# target template ({p}: the allowed upstream port) -> the proxy's answer
CASES = {
    # allowed: the upstream answers
    "http://allowed.test:{p}/": 200,
    "http://ALLOWED.test:{p}/x?y=1": 200,
    "http://allowed.test.:{p}/": 200,
    "HTTP://allowed.test:{p}/a\\b": 200,  # a backslash in the path is path
    "http://allowed.test:{p}": 200,
    "http://allowed.test:0{p}/": 200,
    # denied by the policy
    "http://evil.test:{p}/": 403,
    "http://allowed.test:1/": 403,
    "http://127.0.0.6:{p}/": 403,
    "http://allowed.test/": 403,
    # refused as bad input: never decided for some other reading
    "http://evil.test\\@allowed.test:{p}/": 400,
    "http://allowed.test:{p}\\@evil.test/": 400,
    "http://evil.test\\allowed.test:{p}/": 400,
    "http://user@allowed.test:{p}/": 400,
    "http://user:pw@allowed.test:{p}/": 400,
    "http://allowed.test:{p}@evil.test/": 400,
    "http://allowed.test#@evil.test:{p}/": 400,
    "http://allowed.test?@evil.test:{p}/": 400,
    "http://allowed.test:/": 400,
    "http://allowed.test:99999/": 400,
    "http://allowed.test:abc/": 400,
    "http://allowed.test:-1/": 400,
    "http://allowed.test:0/": 400,  # mitmproxy alone read port 0 as 80
    "http://allowed.test:00/": 400,
    "http://[::1/": 400,
    "http://[allowed.test]:{p}/": 400,
    "http://::1:{p}/": 400,
    "http:///allowed.test:{p}/": 400,
    "http://allowed%2etest:{p}/": 400,
    "http://allowed..test:{p}/": 400,
    "http://allowed.test\x01:{p}/": 400,
    "http://allowed.test :{p}/": 400,
    "http://allowed.test:{p}/ x": 400,
    "http://allowed.test\t:{p}/": 400,
    "http://a" + "b" * 64 + ".test:{p}/": 400,
}


@pytest.mark.parametrize("template", list(CASES), ids=[repr(c)[1:40] for c in CASES])
def test_check_refuses_what_the_proxy_refuses(world: World, template: str) -> None:
    target = template.replace("{p}", str(world.port))
    status = proxy_status(world, target)
    assert status == CASES[template], (target, status)
    expected_exit = {200: 0, 403: 1, 400: 2}[status]
    assert check_exit(world, target) == expected_exit, target


def test_the_issue_example_names_no_host_in_check(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_exit(world, "http://evil.test\\@allowed.test/") == 2
    err = capsys.readouterr().err
    assert "a backslash is not accepted" in err and "allow" not in capsys.readouterr().out
