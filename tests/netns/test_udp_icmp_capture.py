"""UDP and ICMP leave the pod only where allowed (transparent capture, both backends).

A pod namespace and an outside one: `egress-sidecar iptables apply` runs in the pod reading the
pod's /etc/resolv.conf (a bind mount naming the outside name servers). Apps (any UID but 1337)
then: UDP to outside ports is refused at once and no datagram arrives; DNS reaches only the
resolv.conf name servers (a tiny DNS responder outside stands in for them; the real C-library
resolver asks); an ICMP echo via an unprivileged ping socket never leaves. Opened UDP ports and
CIDRs pass, excluded (cluster) CIDRs pass for every protocol, the proxy's UID is untouched, and
the kernel's own ICMP — neighbour discovery, errors — and replies of a UDP server keep working.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.iptables import rules
from tests.netns.conftest import APP_UID, save, split_print
from tests.support import netns as h
from tests.support.netns import CLIENT_SCRIPT, OUT4, OUT6, POD4, POD6, SIDECAR

PROXY_UID = 1337
TOOLS = Path(__file__).with_name("udp_icmp_tools.py")
RESOLVER = {"ipv4": OUT4[0], "ipv6": OUT6[0]}  # the pod's resolv.conf name servers
OTHER = {"ipv4": OUT4[1], "ipv6": OUT6[1]}  # some other resolver outside
UDP_OPEN_NET = {"ipv4": OUT4[2], "ipv6": OUT6[2]}  # opened with --exclude-outbound-udp-cidrs
EXCLUDED = {"ipv4": "198.18.0.5", "ipv6": "fd00:e5::5"}  # a "cluster" CIDR
OPEN_PORT = 8125  # opened with --exclude-outbound-udp-ports
FAMILIES = ["ipv4", "ipv6"]
ADDRESS_A, ADDRESS_AAAA = "198.18.0.9", "fd00:e5::9"  # what the DNS responder answers


def shown(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass
class Pod:
    world: h.World
    backend: str
    udp: h.Upstream  # every datagram that reached an outside UDP server
    dns: h.Upstream  # every query that reached an outside DNS responder
    resolv_conf: Path
    apply_args: list[str]

    def udp_client(self, addr: str, port: int, uid: int) -> dict[str, Any]:
        return self.world.client("udp", addr, str(port), uid=uid)

    def ping(self, addr: str, uid: int) -> dict[str, Any]:
        out = self.world.pod.ok([sys.executable, str(TOOLS), "ping", addr], uid=uid)
        result: dict[str, Any] = json.loads(out)
        return result

    def resolve(self, name: str, family: str, server: str) -> tuple[int, str, float]:
        """`getent ahostsv4|6 NAME` as the app, with a resolv.conf naming only ``server``."""
        conf = self.world.workdir / f"resolv-{server}.conf"
        conf.write_text(f"nameserver {server}\noptions timeout:3 attempts:1\n")
        conf.chmod(0o644)
        hosts = h.hosts_file(self.world.workdir / "hosts-empty", {})
        db = "ahostsv4" if family == "ipv4" else "ahostsv6"
        start = time.monotonic()
        proc = self.world.pod.run(
            ["getent", db, name],
            uid=APP_UID,
            binds={"/etc/resolv.conf": conf, "/etc/hosts": hosts},
            timeout=15,
        )
        return proc.returncode, proc.stdout, time.monotonic() - start

    def echoes_seen_outside(self) -> int:
        """Echo requests from the pod that reached the outside namespace (an INPUT counter)."""
        total = 0
        for tool in ("iptables-nft-save", "ip6tables-nft-save"):
            for line in self.world.outside.ok([tool, "-c"]).splitlines():
                if "EGSC_ECHO_IN" in line and (m := re.match(r"\[(\d+):\d+\]", line)):
                    total += int(m.group(1))
        return total


def _setup_outside(world: h.World) -> tuple[h.Upstream, h.Upstream]:
    for fam in FAMILIES:
        addr = EXCLUDED[fam]
        h._check_address(addr)
        extra = [f"{addr}/24"] if fam == "ipv4" else [f"{addr}/64", "nodad"]
        h.sh(["ip", "-n", world.outside.name, "addr", "add", extra[0], "dev", "eth0", *extra[1:]])
    # Count echo requests arriving from the pod (a rule with a comment, counters read later).
    for tool, icmp in (("iptables-nft", ["-p", "icmp", "--icmp-type", "8"]),
                       ("ip6tables-nft", ["-p", "ipv6-icmp", "--icmpv6-type", "128"])):  # fmt: skip
        world.outside.ok([tool, "-A", "INPUT", *icmp, "-m", "comment", "--comment",
                          "EGSC_ECHO_IN"])  # fmt: skip
    udp = []
    for fam in FAMILIES:
        for port in (8443, 51820, OPEN_PORT):
            udp.append(shown(RESOLVER[fam], port))
        for addr in (OTHER[fam], UDP_OPEN_NET[fam], EXCLUDED[fam]):
            udp.append(shown(addr, 8443))
    upstream = world.start_servers(world.outside, "udp-outside", udp=udp)
    log, ready = world.workdir / "dns.jsonl", world.workdir / "dns.ready"
    listen = [shown(a, 53) for fam in FAMILIES for a in (RESOLVER[fam], OTHER[fam])]
    proc = world.outside.popen(
        [sys.executable, str(TOOLS), "dns-server", "--log", str(log), "--ready", str(ready),
         *listen],
        output=world.workdir / "dns.out",
    )  # fmt: skip
    h.wait_for(ready.exists, 15, "dns responder", proc, world.workdir / "dns.out")
    return upstream, h.Upstream(log)


@pytest.fixture(scope="module")
def world_udp(reaped: list[str]) -> Iterator[tuple[h.World, h.Upstream, h.Upstream]]:
    w = h.create_world()
    try:
        # As container runtimes do: unprivileged ICMP echo sockets for every group.
        w.pod.ok(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        udp, dns = _setup_outside(w)
        yield w, udp, dns
    finally:
        w.close()


@pytest.fixture(scope="module", params=["nft", "legacy"])
def pod(
    request: pytest.FixtureRequest, world_udp: tuple[h.World, h.Upstream, h.Upstream]
) -> Iterator[Pod]:
    world, udp, dns = world_udp
    backend: str = request.param
    resolv = world.workdir / "pod-resolv.conf"
    resolv.write_text(
        "search shop.svc.cluster.local\n"
        f"nameserver {RESOLVER['ipv4']}\nnameserver {RESOLVER['ipv6']}\noptions ndots:5\n"
    )
    resolv.chmod(0o644)
    args = [
        "--ipv6", "on", "--backend", backend,
        "--exclude-outbound-cidrs", f"{EXCLUDED['ipv4']}/32,{EXCLUDED['ipv6']}/128",
        "--exclude-outbound-udp-ports", str(OPEN_PORT),
        "--exclude-outbound-udp-cidrs", f"{UDP_OPEN_NET['ipv4']}/32,{UDP_OPEN_NET['ipv6']}/128",
        # What the filter table lets through, without the sidecar's DNS listener in the way
        # (the redirect to it: tests/netns/test_dns_capture.py).
        "--no-dns-redirect",
    ]  # fmt: skip
    # apply reads /etc/resolv.conf, as egress-init does in the pod: here a bind mount.
    proc = world.pod.run(
        [*SIDECAR, "iptables", "apply", *args], binds={"/etc/resolv.conf": resolv}, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert f"let out to: {RESOLVER['ipv4']}, {RESOLVER['ipv6']}" in proc.stderr
    try:
        yield Pod(world, backend, udp, dns, resolv, args)
    finally:
        clean = [*SIDECAR, "iptables", "clean", "--backend", backend, "--ipv6", "on"]
        assert world.pod.run(clean, timeout=30).returncode == 0


def _datagrams(upstream: h.Upstream, mark: int, local: str) -> int:
    return sum(1 for r in upstream.since(mark) if r["event"] == "datagram" and r["local"] == local)


REFUSED = ("PermissionError", "ConnectionRefusedError")  # EPERM on send or ECONNREFUSED on recv


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [8443, 51820])
@pytest.mark.parametrize("uid", [APP_UID, 0], ids=["app-uid", "root"])
def test_udp_to_outside_ports_is_refused_and_never_arrives(
    pod: Pod, family: str, port: int, uid: int
) -> None:
    addr = RESOLVER[family]
    mark = pod.udp.mark()
    result = pod.udp_client(addr, port, uid)
    # Refused at once (the client's timeout is 2 s: a silent drop would read TimeoutError).
    assert result["reply"] is None and result["error"] in REFUSED, result
    assert _datagrams(pod.udp, mark, shown(addr, port)) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_uid_udp_is_untouched(pod: Pod, family: str) -> None:
    mark = pod.udp.mark()
    assert pod.udp_client(RESOLVER[family], 51820, PROXY_UID)["reply"] == "udp-ok"
    assert _datagrams(pod.udp, mark, shown(RESOLVER[family], 51820)) == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("where", "port"),
    [("opened port", OPEN_PORT), ("opened cidr", 8443), ("excluded cidr", 8443)],
)
def test_opened_udp_passes(pod: Pod, family: str, where: str, port: int) -> None:
    addr = {
        "opened port": RESOLVER,
        "opened cidr": UDP_OPEN_NET,
        "excluded cidr": EXCLUDED,
    }[where][family]
    mark = pod.udp.mark()
    assert pod.udp_client(addr, port, APP_UID)["reply"] == "udp-ok"
    assert _datagrams(pod.udp, mark, shown(addr, port)) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_to_the_resolv_conf_name_server_works(pod: Pod, family: str) -> None:
    mark = pod.dns.mark()
    code, out, _ = pod.resolve("web.shop.test", family, RESOLVER[family])
    assert code == 0, out
    assert out.split()[0] == (ADDRESS_A if family == "ipv4" else ADDRESS_AAAA)
    queries = [r for r in pod.dns.since(mark) if r["local"] == shown(RESOLVER[family], 53)]
    assert [q["qname"] for q in queries][:1] == ["web.shop.test"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_to_another_server_is_refused_at_once(pod: Pod, family: str) -> None:
    mark = pod.dns.mark()
    code, out, seconds = pod.resolve("leak.example.test", family, OTHER[family])
    assert code != 0 and out == ""
    assert seconds < 2.0  # refused, not the 3 s resolver timeout
    assert not [r for r in pod.dns.since(mark) if r["local"] == shown(OTHER[family], 53)]


@pytest.mark.parametrize("family", FAMILIES)
def test_ping_from_the_app_never_leaves(pod: Pod, family: str) -> None:
    before = pod.echoes_seen_outside()
    for uid in (APP_UID, 0):
        for addr in (RESOLVER[family], UDP_OPEN_NET[family]):  # UDP openings do not open ICMP
            result = pod.ping(addr, uid)
            assert result["reply"] is False and result["error"] is not None, result
            assert result["error"] != "TimeoutError", result  # refused, not silently dropped
    assert pod.echoes_seen_outside() == before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uid", [PROXY_UID, APP_UID], ids=["proxy-uid", "app-to-excluded"])
def test_ping_passes_for_the_proxy_and_to_excluded_cidrs(pod: Pod, family: str, uid: int) -> None:
    addr = RESOLVER[family] if uid == PROXY_UID else EXCLUDED[family]
    before = pod.echoes_seen_outside()
    result = pod.ping(addr, uid)
    assert result["reply"] is True, result
    assert pod.echoes_seen_outside() == before + 1


def test_neighbour_discovery_keeps_working(pod: Pod) -> None:
    """Flush both neighbour caches: IPv6 must re-learn the link through NS/NA (ICMPv6 the
    kernel sends) with our rules loaded, and ARP for IPv4 alike."""
    for ns in (pod.world.pod, pod.world.outside):
        ns.ok(["ip", "neigh", "flush", "dev", "eth0"])
    for family in FAMILIES:
        mark = pod.udp.mark()
        assert pod.udp_client(RESOLVER[family], OPEN_PORT, APP_UID)["reply"] == "udp-ok"
        assert _datagrams(pod.udp, mark, shown(RESOLVER[family], OPEN_PORT)) == 1
    neigh = pod.world.pod.ok(["ip", "-6", "neigh", "show", "dev", "eth0"])
    assert RESOLVER["ipv6"] in neigh and "FAILED" not in neigh, neigh


@pytest.mark.parametrize("addr", [POD4, POD6])
def test_the_pods_icmp_errors_and_udp_replies_still_leave(pod: Pod, addr: str) -> None:
    """Kernel ICMP errors (port unreachable to an outside client) are not ours to stop, and a
    UDP server in the pod (root: not exempt) answers outside clients: replies are not egress."""
    client = [sys.executable, str(CLIENT_SCRIPT), "udp", addr]
    closed = json.loads(pod.world.outside.ok([*client, "9"]))
    assert closed == {"reply": None, "error": "ConnectionRefusedError"}
    answered = json.loads(pod.world.outside.ok([*client, "5353"]))
    assert answered == {"reply": "udp-ok", "error": None}


@pytest.fixture(scope="module", autouse=True)
def pod_udp_server(world_udp: tuple[h.World, h.Upstream, h.Upstream]) -> h.Upstream:
    world = world_udp[0]
    return world.start_servers(world.pod, "pod-udp", udp=[f"{POD4}:5353", f"[{POD6}]:5353"])


@pytest.mark.parametrize("family", FAMILIES)
def test_print_with_the_pods_resolv_conf_is_what_apply_loaded(pod: Pod, family: str) -> None:
    printed = pod.world.pod.run(
        [*SIDECAR, "iptables", "print", *pod.apply_args[:2], *pod.apply_args[4:],
         "--resolv-conf", str(pod.resolv_conf)],
        timeout=30,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    expected = rules.saved_form(split_print(printed.stdout)[family])
    assert rules.ours_in_save(save(pod.world, family, pod.backend)) == expected
    assert f"-A EGRESS_SIDECAR_DNS -d {RESOLVER[family]}/" in "\n".join(expected["filter"])
