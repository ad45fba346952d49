"""Transparent capture: the client's first flight is read whole, and decided before any byte of
it goes upstream, whatever kind of rule allows the address.

- A ClientHello dribbled one byte per segment is still read as TLS (not refused as raw TCP); one
  that stops part-way past --first-byte-timeout (3 s here: the whole first flight must be in by
  then, and a 517-byte dribble on a loaded machine takes about a second) is refused.
- To an address a ``cidr`` rule allows, the upstream is opened at once (a server that speaks
  first is heard), but the client's bytes are held until its first flight is decided: an SNI or
  Host that a name deny rule matches is refused, and the upstream receives nothing.

Same harness as test_transparent_proxy: iptables rules from ``egress-sidecar iptables apply``,
the sidecar as UID 1337 in the pod namespace, clients as the app's UID, upstreams outside that
log every accepted connection and every byte received.
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

from tests.netns.conftest import APP_UID, iptables
from tests.support import netns as h
from tests.support.netns import OUT4

WEB4, OTHER4, DB4 = OUT4
CLIENT = Path(__file__).with_name("first_flight_client.py")

# DB4 is allowed by address only; denied.test is denied by name (and resolves to OTHER4).
ALLOWLIST = f"""\
allow:
  - web.test
  - cidr: {DB4}/32
    ports: [80, 3306, 5432, 8443]
deny:
  - denied.test
"""
HOSTS = {"web.test": WEB4, "denied.test": OTHER4}


@dataclass
class Pod:
    world: h.World
    certs: h.Certs
    upstream: h.Upstream
    sidecar_out: Path

    def dribble(self, addr: str, port: int, sni: str, *extra: str) -> dict[str, Any]:
        argv = [sys.executable, str(CLIENT), "tls", addr, str(port), sni, str(self.certs.ca_pem)]
        proc = self.world.pod.run([*argv, *extra], uid=APP_UID, timeout=30)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def curl(self, *args: str) -> tuple[int, str, str]:
        return h.pod_curl(self.world, args, uid=APP_UID)

    def events(self, mark: int, addr: str, port: int, event: str) -> list[dict[str, Any]]:
        local = f"{addr}:{port}"
        return [r for r in self.upstream.since(mark) if r["event"] == event and r["local"] == local]

    def decisions(self) -> list[dict[str, Any]]:
        return h.decisions(self.sidecar_out)

    def last_decision(self, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while True:
            found = [d for d in self.decisions() if all(d.get(k) == v for k, v in match.items())]
            if found or time.monotonic() > deadline:
                assert found, (match, self.decisions()[-5:])
                return found[-1]
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pod(world: h.World) -> Iterator[Pod]:
    w = world
    certs = h.make_certs(w.workdir, [*HOSTS, "db.test"], list(OUT4))
    upstream = w.start_servers(
        w.outside,
        "outside",
        certs,
        http=[f"{DB4}:80", f"{OTHER4}:80"],
        https=[f"{WEB4}:443", f"{OTHER4}:443", f"{DB4}:8443"],
        echo=[f"{DB4}:5432"],
        banner=[f"{DB4}:3306"],
    )
    proc = iptables(w, "apply", "--ipv6", "off")
    assert proc.returncode == 0, proc.stderr
    sidecar = h.start_pod_sidecar(w, ALLOWLIST, HOSTS, extra=["--first-byte-timeout", "3"])
    yield Pod(w, certs, upstream, sidecar.out)


# --- item 4: the whole ClientHello, however it arrives ----------------------------------------


@pytest.mark.parametrize(("addr", "port", "sni"), [(WEB4, 443, "web.test"), (DB4, 8443, "db.test")])
def test_a_clienthello_dribbled_one_byte_per_segment_is_read_as_tls(
    pod: Pod, addr: str, port: int, sni: str
) -> None:
    """By name (web.test) and on a cidr-allowed address (held upstream): the handshake completes
    with the real upstream, whose own certificate the client verifies."""
    mark = pod.upstream.mark()
    result = pod.dribble(addr, port, sni)
    assert result["error"] is None, result
    assert result["fingerprint"] == pod.certs.leaf_der_sha256
    assert result["status"] == 200
    assert len(pod.events(mark, addr, port, "accept")) == 1
    decision = pod.last_decision(protocol="TLS", host=sni)
    assert decision["decision"] == "allow"


def test_a_clienthello_that_stops_past_the_bound_is_refused(pod: Pod) -> None:
    """Half a ClientHello, then silence beyond --first-byte-timeout (3 s): refused, never
    relayed by address, even where a cidr rule allows the address (DB4:5432, an echo server
    that logs every byte)."""
    mark = pod.upstream.mark()
    result = pod.dribble(DB4, 5432, "denied.test", "--piece", "10", "--stall-after", "100",
                         "--stall", "4")  # fmt: skip
    assert result["error"] is not None and result["fingerprint"] is None, result
    assert not pod.events(mark, DB4, 5432, "data")  # not one byte reached the upstream
    decision = pod.last_decision(protocol="TLS", reason="unreadable first flight")
    assert decision["decision"] == "deny" and decision["port"] == 5432


def test_a_partial_http_request_line_past_the_bound_is_refused(pod: Pod) -> None:
    """ "GE" and then nothing: not relayed by address to the cidr-allowed HTTP server (the Host
    that would follow was never decided); closed at the bound, before the client gives up."""
    mark = pod.upstream.mark()
    started = time.monotonic()
    result = pod.world.client("tcp", DB4, "80", "--send", "GE", uid=APP_UID)
    elapsed = time.monotonic() - started
    assert result["connected"] and result["received"] == "", result
    assert elapsed < 4.8, elapsed  # closed by the sidecar at ~3 s, not by the client's 5 s
    assert not pod.events(mark, DB4, 80, "request")
    decision = pod.last_decision(protocol="TCP", reason="unreadable first flight")
    assert decision["decision"] == "deny" and decision["port"] == 80


# --- item 5: deny beats allow across rule kinds -----------------------------------------------


def test_a_denied_sni_to_a_cidr_allowed_address_is_refused_and_sends_nothing(pod: Pod) -> None:
    mark = pod.upstream.mark()
    result = pod.dribble(DB4, 5432, "denied.test", "--piece", "4096")
    assert result["fingerprint"] is None and result["error"] is not None, result
    time.sleep(0.3)  # a late (wrong) relay would show up by now
    assert not pod.events(mark, DB4, 5432, "data")
    decision = pod.last_decision(protocol="TLS", host="denied.test")
    assert decision["decision"] == "deny" and decision["reason"] == "matched deny rule"


@pytest.mark.parametrize(
    ("host", "expect"),
    [("denied.test", 403), (DB4, 200)],
)
def test_plain_http_to_a_cidr_allowed_address_is_decided_by_host(
    pod: Pod, host: str, expect: int
) -> None:
    mark = pod.upstream.mark()
    code, out, err = pod.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}",
                              f"http://{DB4}/x")  # fmt: skip
    assert code == 0, err
    assert out == str(expect)
    requests = pod.events(mark, DB4, 80, "request")
    assert len(requests) == (1 if expect == 200 else 0)


def test_a_server_that_speaks_first_on_a_cidr_allowed_address_is_heard_first(pod: Pod) -> None:
    """The greeting reaches the client before it sends anything; then its bytes are relayed."""
    result = pod.world.client("tcp", DB4, "3306", uid=APP_UID)  # sends nothing
    assert result["received"].startswith(f"220 banner from {DB4}:3306"), result
    mark = pod.upstream.mark()
    echoed = pod.world.client("tcp", DB4, "5432", "--send", "SELECT 1\n", uid=APP_UID)
    assert echoed["received"] == "SELECT 1\n", echoed
    assert pod.events(mark, DB4, 5432, "data")


def test_no_connection_handler_crashed(pod: Pod) -> None:
    """Last in this module: none of the above left a traceback in the sidecar's output."""
    text = "\n".join(h.iter_lines(pod.sidecar_out))
    assert "Traceback" not in text and "has crashed" not in text, text[-3000:]
