"""`egress-sidecar iptables apply|print|clean` in a real pod namespace, both backends.

A stand-in transparent listener on 127.0.0.1:15002 / [::1]:15002 in the pod answers
``captured <original destination>``: what it reports is what the rules redirected. The outside
servers log every connection they accept, so "not redirected" is proven by the upstream seeing
it. The proxy itself is exercised in test_transparent_proxy.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sidecar.iptables import rules
from tests.netns.conftest import APP_UID, iptables, save, split_print
from tests.support import netns as h
from tests.support.netns import OUT4, OUT6, SIDECAR

PROXY_UID = 1337
EXCLUDED4, EXCLUDED6 = OUT4[1], OUT6[1]
RULE_ARGS = [
    "--exclude-outbound-cidrs",
    f"{EXCLUDED4}/32,{EXCLUDED6}/128",
    "--exclude-outbound-ports",
    "2222",
    "--ipv6",
    "on",
]


@dataclass
class Captured:
    world: h.World
    backend: str
    outside: h.Upstream
    stand_in: h.Upstream

    def tcp(self, host: str, port: int, uid: int | None) -> dict[str, object]:
        return self.world.client("tcp", host, str(port), "--send", "ping\n", uid=uid)


def _outside_servers(world: h.World) -> h.Upstream:
    tcp = [f"{a}:{p}" for a in (OUT4[0], OUT4[1]) for p in (80, 2222, 8080)]
    tcp += [f"[{a}]:{p}" for a in (OUT6[0], OUT6[1]) for p in (80, 2222, 8080)]
    udp = [f"{OUT4[0]}:443", f"{OUT4[0]}:53", f"[{OUT6[0]}]:443"]
    return world.start_servers(world.outside, "outside", echo=tcp, udp=udp)


@pytest.fixture(scope="module", params=["nft", "legacy"])
def captured(request: pytest.FixtureRequest, world: h.World) -> Iterator[Captured]:
    backend: str = request.param
    # One world per module, but each backend needs its own empty namespace: clean in between.
    outside = (
        h.Upstream(world.workdir / "outside.jsonl")
        if (world.workdir / "outside.ready").exists()
        else _outside_servers(world)
    )
    stand_in = (
        h.Upstream(world.workdir / "standin.jsonl")
        if (world.workdir / "standin.ready").exists()
        else world.start_servers(
            world.pod,
            "standin",
            capture=["127.0.0.1:15002", "[::1]:15002"],
            echo=["127.0.0.1:7777"],
        )
    )
    proc = iptables(world, "apply", "--backend", backend, *RULE_ARGS)
    assert proc.returncode == 0, proc.stderr
    try:
        yield Captured(world, backend, outside, stand_in)
    finally:
        iptables(world, "clean", "--backend", backend, "--ipv6", "on")


def _reached_outside(upstream: h.Upstream, mark: int, local: str) -> bool:
    return any(r["event"] == "accept" and r["local"] == local for r in upstream.since(mark))


@pytest.mark.parametrize("uid", [APP_UID, 0], ids=["app-uid", "root"])
@pytest.mark.parametrize(("addr", "shown"), [(OUT4[0], OUT4[0]), (OUT6[0], f"[{OUT6[0]}]")])
@pytest.mark.parametrize("port", [80, 8080])
def test_app_tcp_is_redirected_to_the_listener(
    captured: Captured, uid: int, addr: str, shown: str, port: int
) -> None:
    mark = captured.outside.mark()
    result = captured.tcp(addr, port, uid)
    assert result["received"] == f"captured {shown}:{port}\n", result
    assert not _reached_outside(captured.outside, mark, f"{shown}:{port}")


@pytest.mark.parametrize(("addr", "shown"), [(OUT4[0], OUT4[0]), (OUT6[0], f"[{OUT6[0]}]")])
def test_proxy_uid_is_not_redirected(captured: Captured, addr: str, shown: str) -> None:
    mark = captured.outside.mark()
    result = captured.tcp(addr, 80, PROXY_UID)
    assert result["received"] == "ping\n", result
    assert _reached_outside(captured.outside, mark, f"{shown}:80")


@pytest.mark.parametrize(
    ("addr", "port", "shown"),
    [
        (EXCLUDED4, 80, EXCLUDED4),  # excluded CIDR
        (EXCLUDED6, 80, f"[{EXCLUDED6}]"),
        (OUT4[0], 2222, OUT4[0]),  # excluded port
        (OUT6[0], 2222, f"[{OUT6[0]}]"),
    ],
)
def test_exclusions_go_direct(captured: Captured, addr: str, port: int, shown: str) -> None:
    mark = captured.outside.mark()
    result = captured.tcp(addr, port, APP_UID)
    assert result["received"] == "ping\n", result
    assert _reached_outside(captured.outside, mark, f"{shown}:{port}")


def test_loopback_is_not_redirected(captured: Captured) -> None:
    result = captured.tcp("127.0.0.1", 7777, APP_UID)
    assert result["received"] == "ping\n", result


@pytest.mark.parametrize("addr", [OUT4[0], OUT6[0]])
def test_udp_443_is_rejected_for_the_app_only(captured: Captured, addr: str) -> None:
    mark = captured.outside.mark()
    for uid in (APP_UID, 0):
        result = captured.world.client("udp", addr, "443", uid=uid)
        # REJECT in OUTPUT fails the send at once (EPERM) or the next recv (ECONNREFUSED):
        # either way the client learns immediately, and QUIC falls back to TCP.
        assert result["reply"] is None, result
        assert result["error"] in ("PermissionError", "ConnectionRefusedError"), result
    assert not [r for r in captured.outside.since(mark) if r["event"] == "datagram"]
    assert captured.world.client("udp", addr, "443", uid=PROXY_UID)["reply"] == "udp-ok"


def test_udp_is_not_only_rejected_on_443(captured: Captured) -> None:
    """DNS to a server the pod's resolv.conf does not name is refused like any other UDP
    (test_udp_icmp_capture.py covers what is let through)."""
    mark = captured.outside.mark()
    result = captured.world.client("udp", OUT4[0], "53", uid=APP_UID)
    assert result["reply"] is None, result
    assert not [r for r in captured.outside.since(mark) if r["event"] == "datagram"]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_print_shows_exactly_what_apply_loaded(captured: Captured, family: str) -> None:
    printed = iptables(captured.world, "print", *RULE_ARGS)
    assert printed.returncode == 0, printed.stderr
    expected = rules.saved_form(split_print(printed.stdout)[family])
    loaded = rules.ours_in_save(save(captured.world, family, captured.backend))
    assert loaded == expected
    assert set(loaded) == {"nat", "filter"}


# --- lifecycle in a fresh namespace ---------------------------------------------------------

FOREIGN = {
    "iptables": [
        ["-t", "nat", "-N", "OTHER_NAT"],
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "OTHER_NAT"],
        ["-t", "nat", "-A", "OTHER_NAT", "-j", "RETURN"],
        ["-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"],
    ],
    "ip6tables": [["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "RETURN"]],
}


BUILTIN_POLICY = re.compile(r"^:\S+ (ACCEPT|DROP) ")


def _strip(save_text: str) -> list[str]:
    """The rules and user chains of iptables-save output, each prefixed with its table
    (comments, counters, built-in chains and tables left empty are not rules)."""
    out, table = [], ""
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") or (line.startswith(":") and not BUILTIN_POLICY.match(line)):
            out.append(f"{table} {line}")
    return out


def _jumps(save_text: str) -> int:
    return sum(
        1 for line in save_text.splitlines() if line.startswith("-A OUTPUT") and "EGRESS_" in line
    )


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_apply_is_idempotent_and_clean_restores_the_namespace(
    fresh_world: h.World, backend: str
) -> None:
    w = fresh_world
    for tool, cmds in FOREIGN.items():
        for cmd in cmds:
            w.pod.ok([f"{tool}-{backend}", *cmd])
    before = {fam: _strip(save(w, fam, backend)) for fam in ("ipv4", "ipv6")}
    assert len(before["ipv4"]) == 4 and len(before["ipv6"]) == 1, before

    for _ in range(2):  # applying twice leaves one copy of our rules
        proc = iptables(w, "apply", "--backend", backend, *RULE_ARGS)
        assert proc.returncode == 0, proc.stderr
    printed_first = split_print(iptables(w, "print", *RULE_ARGS).stdout)
    for fam in ("ipv4", "ipv6"):
        now = save(w, fam, backend)
        # nat: TCP (and UDP and TCP 53 when resolv.conf names a server of this family);
        # filter: everything but TCP.
        wanted = rules.saved_form(printed_first[fam])
        assert _jumps(now) == sum(1 for lines in wanted.values() for x in lines if "-A OUTPUT" in x)
        assert _jumps(now) >= 2
        assert set(before[fam]) <= set(_strip(now))  # foreign rules untouched

    # Re-apply with other options replaces ours: only port 80, no QUIC reject.
    narrowed = ["--include-outbound-ports", "80", "--no-quic-reject", "--ipv6", "on"]
    assert iptables(w, "apply", "--backend", backend, *narrowed).returncode == 0
    printed = split_print(iptables(w, "print", *narrowed).stdout)
    for fam in ("ipv4", "ipv6"):
        assert rules.ours_in_save(save(w, fam, backend)) == rules.saved_form(printed[fam])

    proc = iptables(w, "clean", "--backend", backend, "--ipv6", "on")
    assert proc.returncode == 0, proc.stderr
    for fam in ("ipv4", "ipv6"):
        assert _strip(save(w, fam, backend)) == before[fam]
    # clean is idempotent too
    assert iptables(w, "clean", "--backend", backend, "--ipv6", "on").returncode == 0


def test_clean_leaves_no_rules_at_all(fresh_world: h.World) -> None:
    w = fresh_world
    assert iptables(w, "apply", "--ipv6", "on").returncode == 0
    assert "EGRESS_SIDECAR_OUTPUT" in save(w, "ipv4")
    assert iptables(w, "clean", "--ipv6", "on").returncode == 0
    for fam in ("ipv4", "ipv6"):
        text = save(w, fam)
        assert not any(line.startswith("-A ") for line in text.splitlines()), text
        chains = [line for line in text.splitlines() if line.startswith(":")]
        assert all(c.split()[1] in ("ACCEPT", "DROP") for c in chains), chains  # built-ins only


def test_auto_backend_follows_iptables_version(fresh_world: h.World) -> None:
    version = fresh_world.pod.ok(["iptables", "--version"])
    used = "nft" if "nf_tables" in version else "legacy"
    assert iptables(fresh_world, "apply", "--ipv6", "off").returncode == 0
    assert "EGRESS_SIDECAR_OUTPUT" in save(fresh_world, "ipv4", used)
    other = "legacy" if used == "nft" else "nft"
    assert "EGRESS_SIDECAR_OUTPUT" not in save(fresh_world, "ipv4", other)


def test_apply_without_privileges_fails_clearly(fresh_world: h.World) -> None:
    proc = iptables(fresh_world, "apply", "--ipv6", "off", uid=APP_UID)
    assert proc.returncode == 1
    assert "egress-sidecar iptables apply:" in proc.stderr
    assert "iptables" in proc.stderr.split(":", 1)[1]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_apply_and_clean_work_on_a_read_only_root(fresh_world: h.World, backend: str) -> None:
    """The egress-init container has readOnlyRootFilesystem: /run is read-only too, where the
    legacy tools keep their lock file by default."""
    script = (
        "set -e; mount -t tmpfs tmpfs /run; mount -o remount,ro /run; "
        "mount -t tmpfs tmpfs /dev/shm; mount -o remount,bind,ro /; "
        '"$@" apply --ipv6 on --dns-servers 198.18.0.2 --backend ' + backend + "; "
        f"{backend_save(backend)} | grep -c EGRESS_SIDECAR_; "
        '"$@" clean --ipv6 on --backend ' + backend
    )
    private = ["unshare", "-m", "--propagation", "private", "--"]
    proc = fresh_world.pod.run(
        [*private, "sh", "-c", script, "sh", *SIDECAR, "iptables"], timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    opts = rules.CaptureOptions(dns_servers=rules.parse_addresses("198.18.0.2"))
    expected = rules.saved_form(rules.render_rules(opts, rules.Family.IPV4))
    assert int(proc.stdout.split()[0]) == sum(len(lines) for lines in expected.values())
    assert "EGRESS" not in save(fresh_world, "ipv4", backend)


def backend_save(backend: str) -> str:
    return f"iptables-{backend}-save"


def test_dry_run_shows_the_replacement_and_changes_nothing(fresh_world: h.World) -> None:
    w = fresh_world
    assert iptables(w, "apply", "--ipv6", "off").returncode == 0
    before = save(w, "ipv4")
    proc = iptables(w, "apply", "--ipv6", "off", "--include-outbound-ports", "80", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "-D OUTPUT -p tcp -j EGRESS_SIDECAR_OUTPUT\n" in proc.stdout
    assert "--dport 80 -j REDIRECT --to-ports 15002" in proc.stdout
    assert _strip(save(w, "ipv4")) == _strip(before)


def test_capture_fails_closed_when_the_sidecar_is_not_listening(fresh_world: h.World) -> None:
    w = fresh_world
    outside = w.start_servers(w.outside, "outside", echo=[f"{OUT4[0]}:80", f"[{OUT6[0]}]:80"])
    assert iptables(w, "apply", "--ipv6", "on", "--proxy-port", "15999").returncode == 0
    for addr in (OUT4[0], OUT6[0]):
        result = w.client("tcp", addr, "80", "--send", "ping\n", uid=APP_UID)
        assert result == {"connected": False, "received": "", "error": "ConnectionRefusedError"}
    assert not [r for r in outside.records() if r["event"] == "accept"]
