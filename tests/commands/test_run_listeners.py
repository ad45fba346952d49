"""`egress-sidecar run` given one address for two listeners refuses to start (exit 2, both
flags named) instead of running without one of them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.sidecar import free_ports, start_sidecar


@pytest.mark.parametrize(
    ("clash", "names"),
    [
        ("health", ("--transparent-listen", "--health-listen")),
        ("dns", ("--explicit-listen", "--dns-listen")),
        ("wildcard", ("--explicit-listen", "--health-listen")),
    ],
)
def test_one_address_for_two_listeners_is_refused(
    tmp_path: Path, clash: str, names: tuple[str, str]
) -> None:
    explicit, transparent, health, dns = free_ports(4)
    args = ["--dns-listen", f"127.0.0.1:{explicit if clash == 'dns' else dns}"]
    if clash == "health":
        health = transparent
    elif clash == "wildcard":
        args += ["--health-listen", f"0.0.0.0:{explicit}"]  # the last one given counts
    sidecar = start_sidecar(
        tmp_path,
        allowlist="allow: [web.test]\n",
        ports=(explicit, transparent, health),
        args=args,
        wait=False,
    )
    assert sidecar.proc.wait(60) == 2, sidecar.stderr
    deadline = time.monotonic() + 10  # the pump thread reads stderr to its end
    while not any("same address" in line for line in sidecar.stderr):
        assert time.monotonic() < deadline, sidecar.stderr
        time.sleep(0.05)
    first, second = names
    message = next(line for line in sidecar.stderr if "same address" in line)
    assert message.startswith(f"egress-sidecar run: {first} "), message
    assert f" and {second} " in message and "same address" in message
    assert not any('"msg":"starting"' in line for line in sidecar.stderr)  # nothing was bound
