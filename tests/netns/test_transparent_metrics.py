"""Transparent capture's metrics, from a pod's sidecar scraped inside the pod's network
namespace: TLS and raw TCP streams count as tunnels (duration, open gauge) and their upstream
bytes as the kernel counted them; a denied stream counts a decision and no tunnel."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.netns.conftest import APP_UID, iptables
from tests.support import netns as h
from tests.support.netns import OUT4
from tests.support.scrape import Scrape

WEB4, OTHER4, DB4 = OUT4
ALLOWLIST = f"""\
allow:
  - web.test
  - cidr: {DB4}/32
    ports: [5432]
"""
HOSTS = {"web.test": WEB4, "denied.test": OTHER4}
PAYLOAD = "x" * 5000 + "\n"  # echoed back by the upstream


@dataclass(frozen=True)
class Pod:
    world: h.World
    certs: h.Certs


@pytest.fixture(scope="module")
def pod(world: h.World) -> Iterator[Pod]:
    certs = h.make_certs(world.workdir, list(HOSTS), list(OUT4))
    world.start_servers(
        world.outside,
        "outside",
        certs,
        https=[f"{a}:443" for a in OUT4],
        echo=[f"{DB4}:5432", f"{OTHER4}:5432"],
    )
    proc = iptables(world, "apply", "--ipv6", "off")
    assert proc.returncode == 0, proc.stderr
    h.start_pod_sidecar(world, ALLOWLIST, HOSTS, private_ranges=["198.18.0.0/15"])
    yield Pod(world, certs)


def scrape(w: h.World) -> Scrape:
    code, body, err = h.pod_curl(w, ["-s", "http://127.0.0.1:15021/metrics"], uid=APP_UID)
    assert code == 0, err
    return Scrape(body)


def wait_for(w: h.World, check: Callable[[Scrape], bool], timeout: float = 10) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(w)
        if check(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_tls_and_tcp_streams_are_tunnels_with_their_bytes(pod: Pod) -> None:
    w = pod.world
    before = scrape(w)
    code, body, err = h.pod_curl(
        w,
        [
            "--cacert",
            str(pod.certs.ca_pem),
            "--resolve",
            f"web.test:443:{WEB4}",
            "https://web.test/m",
        ],
        uid=APP_UID,
    )
    assert code == 0, err
    echoed = w.client("tcp", DB4, "5432", "--send", PAYLOAD, uid=APP_UID)
    assert echoed["received"] == PAYLOAD, echoed

    tls = {"decision": "allow", "capture": "transparent", "kind": "tls"}
    tcp = {"decision": "allow", "capture": "transparent", "kind": "tcp"}
    count = "egress_tunnel_duration_seconds_count"
    after = wait_for(
        w,
        lambda s: delta(s, before, count, **tls) >= 1 and delta(s, before, count, **tcp) >= 1,
    )
    assert delta(after, before, count, **tls) == 1
    assert delta(after, before, count, **tcp) == 1
    assert after.value("egress_open_tunnels") == 0
    # The TLS stream carried a ClientHello and a request up, a certificate and a response down.
    assert delta(after, before, "egress_upstream_sent_bytes_total", kind="tls") > 200
    assert delta(after, before, "egress_upstream_received_bytes_total", kind="tls") > len(body)
    # The raw TCP stream: exactly the payload each way (a FIN may count one).
    sent = delta(after, before, "egress_upstream_sent_bytes_total", kind="tcp")
    received = delta(after, before, "egress_upstream_received_bytes_total", kind="tcp")
    assert len(PAYLOAD) <= sent <= len(PAYLOAD) + 1
    assert len(PAYLOAD) <= received <= len(PAYLOAD) + 1
    # Each also counts as a request, timed from its start to its decision and connect.
    assert delta(after, before, "egress_request_duration_seconds_count", **tls) == 1


def test_a_denied_stream_is_a_decision_not_a_tunnel(pod: Pod) -> None:
    w = pod.world
    before = scrape(w)
    denied = w.client("tcp", OTHER4, "5432", "--send", PAYLOAD, uid=APP_UID)
    assert denied["received"] == "", denied
    deny = {"decision": "deny", "capture": "transparent", "kind": "tcp"}
    after = wait_for(
        w, lambda s: delta(s, before, "egress_request_duration_seconds_count", **deny) >= 1
    )
    assert delta(after, before, "egress_request_duration_seconds_count", **deny) == 1
    assert delta(after, before, "egress_tunnel_duration_seconds_count", **deny) == 0
