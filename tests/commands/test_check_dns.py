"""`egress-sidecar check dns NAME [TYPE]`: the DNS listener's decision, as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "egress-sidecar"

ALLOWLIST = """\
allow:
  - api.stripe.com
  - "*.googleapis.com"
  - host: mydb.example.com
    ports: [5432]
deny:
  - upload.googleapis.com
"""


def check(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    allowlist = tmp_path / "allowlist.yaml"
    allowlist.write_text(ALLOWLIST)
    proc = subprocess.run(
        [str(BIN), "check", "--allowlist-file", str(allowlist), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "first_line"),
    [
        (("dns", "api.stripe.com"), 0, "allow dns api.stripe.com A (forwarded)"),
        (("dns", "API.Stripe.com.", "txt"), 0, "allow dns api.stripe.com TXT (forwarded)"),
        (("dns", "mydb.example.com", "AAAA"), 0, "allow dns mydb.example.com AAAA (forwarded)"),
        (("dns", "evil.test", "TXT"), 1, "deny dns evil.test TXT (answered NXDOMAIN)"),
        (("dns", "upload.googleapis.com"), 1,
         "deny dns upload.googleapis.com A (answered NXDOMAIN)"),
        (("dns", "api.stripe.com", "AXFR"), 1, "deny dns api.stripe.com AXFR (answered NXDOMAIN)"),
        (("dns", "web.shop.svc.cluster.local"), 0,
         "allow dns web.shop.svc.cluster.local A (forwarded)"),
        (("--internal-domain", "corp.internal", "dns", "x.corp.internal", "TXT"), 0,
         "allow dns x.corp.internal TXT (forwarded)"),
        (("--address", "169.254.169.254", "dns", "api.stripe.com"), 1,
         "deny dns api.stripe.com A (answered NXDOMAIN)"),
        (("--address", "8.8.8.8", "dns", "api.stripe.com"), 0,
         "allow dns api.stripe.com A (forwarded)"),
        (("--mode", "audit", "dns", "evil.test"), 0, "audit dns evil.test A (forwarded)"),
    ],
)  # fmt: skip
def test_check_dns(tmp_path: Path, args: tuple[str, ...], code: int, first_line: str) -> None:
    got, out, err = check(tmp_path, *args)
    assert got == code, (out, err)
    assert out.splitlines()[0] == first_line


def test_check_dns_json_and_reason(tmp_path: Path) -> None:
    code, out, _ = check(
        tmp_path, "--json", "--address", "169.254.169.254", "dns", "api.stripe.com"
    )
    assert code == 1
    body = json.loads(out)
    assert body["reason"] == "private address"
    assert body["answer"] == "NXDOMAIN"
    assert "169.254.169.254 is cloud metadata" in body["detail"]
    code, out, _ = check(tmp_path, "--json", "dns", "_pg._tcp.mydb.example.com", "SRV")
    assert code == 0
    assert json.loads(out)["rule"] == "{host: mydb.example.com, ports: [5432]}"


def test_check_dns_bad_input_exits_2(tmp_path: Path) -> None:
    assert check(tmp_path, "dns", "a.test", "A", "extra")[0] == 2
    assert check(tmp_path, "--resolve", "dns", "a.test")[0] == 2
    assert check(tmp_path, "a.test", "b.test")[0] == 2
    # A host that happens to be called "dns" is still a destination.
    assert check(tmp_path, "dns")[0] == 1
