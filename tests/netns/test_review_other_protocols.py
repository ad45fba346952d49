"""Review of issue 8 item 8: "UDP" is more than ``-p udp``, and ICMP echo is not the only
datagram an app can send without the proxy.

UDP-Lite (IP protocol 136) is a datagram socket any unprivileged user may open
(``socket(AF_INET, SOCK_DGRAM, IPPROTO_UDPLITE)``), and ``-p udp`` does not match it; a root app
container with CAP_NET_RAW (in the default capability set of Docker and containerd) sends any
IP protocol from a raw socket. Both must be refused like UDP is, for both families and both
backends, while the proxy's UID, excluded CIDRs and the kernel's own ICMP keep working.
Arrivals are counted outside by INPUT rules with a comment (nothing needs to listen).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netns.conftest import APP_UID
from tests.support import netns as h
from tests.support.netns import OUT4, OUT6, SIDECAR

PROXY_UID = 1337
DEST = {"ipv4": OUT4[0], "ipv6": OUT6[0]}
EXCLUDED = {"ipv4": OUT4[1], "ipv6": OUT6[1]}  # --exclude-outbound-cidrs: passes every protocol
FAMILIES = ["ipv4", "ipv6"]
COUNTED = "EGSC_OTHER_IN"

# (name, socket type, protocol, needs root): what an app in the pod can send besides TCP/UDP.
SENDERS = {
    "udplite": ("SOCK_DGRAM", 136, False),
    "raw-proto-253": ("SOCK_RAW", 253, True),
    # ICMP from a raw socket: echo reply, a forged "unreachable", a timestamp request (IPv6:
    # echo reply twice and an unreachable), each with a payload and about no flow of the pod.
    "forged-icmp": ("SOCK_RAW", 1, True),
}
ICMP_COUNTED = {"icmp": ("0", "3", "13"), "ipv6-icmp": ("129", "1")}

_SEND = """
import json, socket, struct, sys
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
out = {"sent": False, "error": None}
try:
    proto = int(sys.argv[3])
    if proto == 1 and family == socket.AF_INET6:
        proto = socket.IPPROTO_ICMPV6  # the kernel fills in an ICMPv6 checksum
    with socket.socket(family, getattr(socket, sys.argv[2]), proto) as s:
        s.settimeout(1.0)
        port = 0 if sys.argv[2] == "SOCK_RAW" else 9999
        for n in range(3):
            data = b"exfiltrated-bytes" * 4
            if proto == 1:
                kind = (0, 3, 13)[n]
                head = struct.pack("!BBHHH", kind, 0, 0, 7, n)
                data = head[:2] + struct.pack("!H", checksum(head + data)) + head[4:] + data
            elif proto == socket.IPPROTO_ICMPV6:
                data = struct.pack("!BBHHH", (129, 1, 129)[n], 0, 0, 7, n) + data
            s.sendto(data, (sys.argv[1], port))
        out["sent"] = True
except OSError as exc:
    out["error"] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def world_other(reaped: list[str]) -> Iterator[h.World]:
    w = h.create_world()
    try:
        comment = ["-m", "comment", "--comment", COUNTED]
        for tool in ("iptables-nft", "ip6tables-nft"):
            for proto in ("136", "253"):
                w.outside.ok([tool, "-A", "INPUT", "-p", proto, *comment])
        for icmp, types in ICMP_COUNTED.items():
            tool = "iptables-nft" if icmp == "icmp" else "ip6tables-nft"
            option = "--icmp-type" if icmp == "icmp" else "--icmpv6-type"
            for t in types:
                w.outside.ok([tool, "-A", "INPUT", "-p", icmp, option, t, *comment])
        # Learn the neighbours first (ARP, NDP take up to a second): an allowed packet then
        # arrives at once, so "nothing arrived" below is not just "not arrived yet".
        before = arrived(w)
        for addr in (*DEST.values(), *EXCLUDED.values()):
            send(w, "raw-proto-253", addr, 0)
        assert wait_arrived(w, before + 3 * 4), "the packets of the warm-up never arrived"
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module", params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest, world_other: h.World) -> Iterator[str]:
    name: str = request.param
    excluded = f"{EXCLUDED['ipv4']}/32,{EXCLUDED['ipv6']}/128"
    args = ["--ipv6", "on", "--backend", name, "--dns-servers", f"{DEST['ipv4']},{DEST['ipv6']}",
            "--exclude-outbound-cidrs", excluded]  # fmt: skip
    proc = world_other.pod.run([*SIDECAR, "iptables", "apply", *args], timeout=30)
    assert proc.returncode == 0, proc.stderr
    try:
        yield name
    finally:
        clean = [*SIDECAR, "iptables", "clean", "--backend", name, "--ipv6", "on"]
        assert world_other.pod.run(clean, timeout=30).returncode == 0


def arrived(world: h.World) -> int:
    total = 0
    for tool in ("iptables-nft-save", "ip6tables-nft-save"):
        for line in world.outside.ok([tool, "-c"]).splitlines():
            if COUNTED in line and (m := re.match(r"\[(\d+):\d+\]", line)):
                total += int(m.group(1))
    return total


def wait_arrived(world: h.World, count: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while arrived(world) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def send(world: h.World, sender: str, addr: str, uid: int) -> dict[str, object]:
    kind, proto, _ = SENDERS[sender]
    out = world.pod.ok([sys.executable, "-c", _SEND, addr, kind, str(proto)], uid=uid)
    result: dict[str, object] = json.loads(out)
    return result


def _uids(sender: str) -> list[int]:
    return [0] if SENDERS[sender][2] else [APP_UID, 0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_other_datagram_protocols_never_leave(
    world_other: h.World, backend: str, sender: str, family: str
) -> None:
    for uid in _uids(sender):
        before = arrived(world_other)
        send(world_other, sender, DEST[family], uid)
        time.sleep(0.3)  # an allowed packet arrives within milliseconds (neighbours known)
        assert arrived(world_other) == before, f"{sender} as uid {uid} left the pod ({backend})"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_other_protocols_pass_for_the_proxy_and_to_excluded_cidrs(
    world_other: h.World, backend: str, sender: str, family: str
) -> None:
    """The counters see these packets when they are allowed: the test above can fail."""
    proxy_uid = PROXY_UID if not SENDERS[sender][2] else None
    if proxy_uid is not None:
        before = arrived(world_other)
        assert send(world_other, sender, DEST[family], proxy_uid)["sent"] is True
        assert wait_arrived(world_other, before + 3) and arrived(world_other) == before + 3
    before = arrived(world_other)
    assert send(world_other, sender, EXCLUDED[family], _uids(sender)[0])["sent"] is True
    assert wait_arrived(world_other, before + 3) and arrived(world_other) == before + 3
