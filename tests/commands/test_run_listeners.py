"""`egress-sidecar run` given one address for two listeners refuses to start (exit 2, both
flags named) instead of running without one of them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.sidecar import BIN, free_ports

ALLOWLIST = "allow: [web.test]\n"


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
    if clash == "health":
        health = transparent
    elif clash == "dns":
        dns = explicit
    health_host = "0.0.0.0" if clash == "wildcard" else "127.0.0.1"
    if clash == "wildcard":
        health = explicit
    allowlist = tmp_path / "allowlist.yaml"
    allowlist.write_text(ALLOWLIST)
    run = subprocess.run(
        [
            str(BIN / "egress-sidecar"),
            "run",
            "--allowlist-file",
            str(allowlist),
            "--explicit-listen",
            f"127.0.0.1:{explicit}",
            "--transparent-listen",
            f"127.0.0.1:{transparent}",
            "--transparent-listen6",
            "off",
            "--health-listen",
            f"{health_host}:{health}",
            "--dns-listen",
            f"127.0.0.1:{dns}",
            "--dns-listen6",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    first, second = names
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith(f"egress-sidecar run: {first} "), message
    assert f" and {second} " in message and "same address" in message
    assert '"msg":"starting"' not in run.stderr  # refused before anything was bound
