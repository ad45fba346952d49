"""`egress-sidecar run --configmap` as a real process against the test API server: edits,
invalid edits, deletion and open tunnels through the real proxy, and a 20-second load test
while the ConfigMap flips between two versions."""

from __future__ import annotations

import json
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sidecar.policy.parse import parse_allowlist
from tests.support.kubeapi import FakeKubeAPI, wait_until
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.sockets import HEAD_END, recv_head
from tests.support.tls import TestCA
from tests.support.upstream import UpstreamServer

NS, NAME = "shop", "egress-allowlist"
API_ADDR, WEB_ADDR = "127.0.0.2", "127.0.0.3"


@dataclass
class World:
    kubeapi: FakeKubeAPI
    sidecar: Sidecar
    api: UpstreamServer  # HTTPS upstream with its own certificate for api.test
    web: UpstreamServer  # plain HTTP: both.test, only-a.test, only-b.test
    ca_file: Path


def start_world(tmp: Path, test_ca: TestCA, ca_file: Path, allowlist: str) -> World:
    kubeapi = FakeKubeAPI(bookmark_interval=1.0)
    kubeapi.start()
    api = UpstreamServer(API_ADDR, label="api", tls=test_ca.issue("api.test").write(tmp, "api"))
    api.start()
    web = UpstreamServer(WEB_ADDR, label="web").start()
    kubeapi.put_configmap(
        NS, NAME, {"allowlist.yaml": allowlist.format(api=api.port, web=web.port)}
    )
    kubeconfig = kubeapi.write_kubeconfig(tmp / "kubeconfig", namespace=NS)
    sidecar = start_sidecar(
        tmp,
        hosts={
            "api.test": API_ADDR,
            "both.test": WEB_ADDR,
            "only-a.test": WEB_ADDR,
            "only-b.test": WEB_ADDR,
        },
        args=[
            "--configmap",
            f"{NS}/{NAME}",
            "--kubeconfig",
            str(kubeconfig),
            "--allow-private-range",
            "127.0.0.0/8",
        ],
        env={"POD_NAME": "checkout-7d9f-abcde", "POD_NAMESPACE": NS, "NODE_NAME": "node-1"},
    )
    return World(kubeapi, sidecar, api, web, ca_file)


def stop_world(world: World) -> None:
    code = world.sidecar.stop()
    world.api.stop()
    world.web.stop()
    world.kubeapi.stop()
    assert code == 0, world.sidecar.stderr[-20:]


def https_get(tls: ssl.SSLSocket, host: str, path: str) -> int:
    """One keep-alive request on an open TLS connection; returns the status."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = recv_head(tls)
    assert HEAD_END in data, "connection closed"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        body += chunk
    return int(head.split(b" ", 2)[1])


def ready_body(sidecar: Sidecar) -> dict[str, object]:
    code, body = sidecar.health("/healthz/ready")
    loaded: dict[str, object] = json.loads(body)
    loaded["_code"] = code
    return loaded


BASIC = """
allow:
  - host: api.test
    ports: [{api}]
  - host: both.test
    ports: [{web}]
"""


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, ca_file: Path
) -> Iterator[World]:
    """One sidecar for the module (its start costs seconds); each test sets the ConfigMap."""
    w = start_world(tmp_path_factory.mktemp("configmap-e2e"), test_ca, ca_file, BASIC)
    yield w
    stop_world(w)


def set_version(world: World, data: dict[str, str]) -> str:
    """Write the ConfigMap and wait until the sidecar enforces that version."""
    rv = world.kubeapi.put_configmap(NS, NAME, data)
    expected = {"source": f"configmap:{NS}/{NAME}", "version": rv}
    wait_until(lambda: ready_body(world.sidecar)["policy"] == expected)
    return rv


def test_edits_reach_the_proxy_and_open_tunnels_stay_open(world: World) -> None:
    sidecar, kubeapi, api = world.sidecar, world.kubeapi, world.api
    set_version(world, {"allowlist.yaml": BASIC.format(api=api.port, web=world.web.port)})
    assert ready_body(sidecar)["_code"] == 200
    # A tunnel opened under the first version...
    sock, head = sidecar.connect_tunnel(f"api.test:{api.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(world.ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="api.test")
    try:
        assert https_get(tls, "api.test", "/before") == 200
        # ...stays open after an edit that no longer allows api.test,
        rv = kubeapi.put_configmap(
            NS, NAME, {"allowlist.yaml": f"allow:\n  - both.test:{world.web.port}\n"}
        )
        wait_until(
            lambda: (
                ready_body(sidecar)["policy"] == {"source": f"configmap:{NS}/{NAME}", "version": rv}
            )
        )
        assert https_get(tls, "api.test", "/after") == 200
        # while a new tunnel is decided by the new version.
        sock2, head2 = sidecar.connect_tunnel(f"api.test:{api.port}")
        sock2.close()
        assert head2.startswith(b"HTTP/1.1 403"), head2
        assert f"x-egress-policy-version: {rv}".encode() in head2
    finally:
        tls.close()
    assert [r["path"] for r in api.seen.requests] == ["/before", "/after"]


def test_invalid_edit_and_deletion_through_the_running_sidecar(world: World) -> None:
    sidecar, kubeapi = world.sidecar, world.kubeapi
    proxies = {"http": sidecar.proxy_url}
    url = f"http://both.test:{world.web.port}/x"
    good = set_version(world, {"allowlist.yaml": BASIC.format(api=1, web=world.web.port)})
    bad = kubeapi.put_configmap(NS, NAME, {"allowlist.yaml": "allow:\n  - 'api.*.test'\n"})
    (event,) = wait_until(lambda: kubeapi.events_for(NS, NAME))
    assert event["reason"] == "InvalidAllowlist" and event["type"] == "Warning"
    assert event["involvedObject"]["resourceVersion"] == bad
    assert event["reportingInstance"] == "checkout-7d9f-abcde"
    assert event["source"]["host"] == "node-1"
    assert requests.get(url, proxies=proxies, timeout=5).status_code == 200  # still the good one
    assert ready_body(sidecar)["policy"] == {"source": f"configmap:{NS}/{NAME}", "version": good}
    _, metrics = sidecar.health("/metrics")
    assert (
        f'egress_policy_reloads_total{{result="invalid",source="configmap:{NS}/{NAME}"}} 1.0'
        in metrics
    )
    rejected = [line for line in sidecar.stderr if "allowlist rejected" in line]
    assert rejected and json.loads(rejected[0])["version"] == bad
    # Deleted: every call is denied with "policy deleted" until it comes back.
    kubeapi.delete_configmap(NS, NAME)

    def denied_deleted() -> bool:
        r = requests.get(url, proxies=proxies, timeout=5)
        return r.status_code == 403 and r.headers["x-egress-reason"] == "policy deleted"

    wait_until(denied_deleted)
    kubeapi.put_configmap(NS, NAME, {"allowlist.yaml": BASIC.format(api=1, web=world.web.port)})
    wait_until(lambda: requests.get(url, proxies=proxies, timeout=5).status_code == 200)


# -- load: the ConfigMap flips between two versions for 20 s ----------------------------------

# The same host allowed by both versions through differently written rules, so that the rule a
# decision names tells which document decided it.
VERSION_A = """
allow:
  - both.test:{web}
  - only-a.test:{web}
"""
VERSION_B = """
allow:
  - host: both.test
    ports: [{web}]
  - host: only-b.test
    ports: [{web}]
"""
HOSTS = ("both.test", "only-a.test", "only-b.test")


@dataclass
class Sent:
    url: str
    host: str
    started: float  # monotonic
    ended: float
    status: int  # 0: the request failed
    version_header: str | None


def test_load_while_the_configmap_flips(world: World) -> None:
    seconds, clients, flip_every = 12.0, 4, 0.2  # 60 flips under load
    kubeapi, web_port = world.kubeapi, world.web.port
    docs = {
        "A": {"allowlist.yaml": VERSION_A.format(web=web_port)},
        "B": {"allowlist.yaml": VERSION_B.format(web=web_port)},
    }
    rules = {
        kind: {r.text for r in parse_allowlist(doc["allowlist.yaml"], source="x").allow_rules}
        for kind, doc in docs.items()
    }
    assert not rules["A"] & rules["B"]  # every rule tells which version decided
    first = set_version(world, docs["A"])
    kind_of: dict[str, str] = {first: "A"}
    writes: list[tuple[float, float, str]] = [(0.0, 0.0, first)]  # (monotonic, wall, rv)
    sent: list[Sent] = []
    lock = threading.Lock()
    stop = threading.Event()
    t_end = time.monotonic() + seconds

    def client(n: int) -> None:
        session = requests.Session()
        session.proxies = {"http": world.sidecar.proxy_url}
        i = 0
        while not stop.is_set() and time.monotonic() < t_end and i < 100_000:
            host = HOSTS[(i + n) % len(HOSTS)]
            url = f"http://{host}:{web_port}/c{n}/{i}"
            i += 1
            started = time.monotonic()
            try:
                r = session.get(url, timeout=10)
                status, header = r.status_code, r.headers.get("x-egress-policy-version")
            except requests.RequestException:
                status, header = 0, None
            record = Sent(url, host, started, time.monotonic(), status, header)
            with lock:
                sent.append(record)

    def flipper() -> None:
        kind = "A"
        while not stop.wait(flip_every) and time.monotonic() < t_end:
            kind = "B" if kind == "A" else "A"
            mono, wall = time.monotonic(), time.time()
            rv = kubeapi.put_configmap(NS, NAME, docs[kind])
            with lock:
                kind_of[rv] = kind
                writes.append((mono, wall, rv))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    threads.append(threading.Thread(target=flipper, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    stop.set()
    assert not any(t.is_alive() for t in threads)

    # Decision lines leave in batches (every ~20 ms): wait for the last ones, bounded.
    wanted = {s.url for s in sent}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        decisions = {d["url"]: d for d in world.sidecar.decisions() if d.get("url")}
        if wanted <= decisions.keys():
            break
        time.sleep(0.1)
    write_time = {rv: mono for mono, _, rv in writes}
    problems: list[str] = []
    for s in sent:
        if s.host == "both.test" and s.status != 200:
            problems.append(f"{s.url}: allowed by both versions, got {s.status}")
            continue
        d = decisions.get(s.url)
        if d is None:
            problems.append(f"{s.url}: no decision logged (status {s.status})")
            continue
        rv = d["policy_version"]
        kind = kind_of.get(rv)
        if kind is None:
            problems.append(f"{s.url}: decided by unknown version {rv}")
            continue
        allowed = s.host == "both.test" or s.host == f"only-{kind.lower()}.test"
        if (d["decision"] == "allow") != allowed:
            problems.append(f"{s.url}: {d['decision']} under version {rv} ({kind})")
        if allowed and d.get("rule") not in rules[kind]:
            problems.append(f"{s.url}: rule {d.get('rule')!r} is not in version {rv} ({kind})")
        if (s.status == 200) != allowed or (not allowed and s.version_header != rv):
            problems.append(f"{s.url}: response {s.status} {s.version_header} vs decision {rv}")
        # The version must have been written before the response, and not superseded more
        # than a second before the request was sent.
        newer = [mono for mono, _, v in writes if write_time[rv] < mono]
        if write_time[rv] > s.ended or (newer and min(newer) < s.started - 1.0):
            problems.append(f"{s.url}: stale or future version {rv}")
    assert problems == [], problems[:20]

    # How long after a write new requests could still be decided by the version it replaced.
    stale = [0.0]
    for s in sent:
        d = decisions[s.url]
        newer = [mono for mono, _, v in writes if write_time[d["policy_version"]] < mono]
        if newer and s.started > min(newer):
            stale.append(s.started - min(newer))

    # Propagation through the proxy: write -> first decision logged under that version.
    first_decided: dict[str, float] = {}
    for d in decisions.values():
        ts = time.mktime(time.strptime(d["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        ts += int(d["ts"][20:23]) / 1000
        rv = d["policy_version"]
        first_decided[rv] = min(first_decided.get(rv, ts), ts)
    lags = [first_decided[rv] - wall for _, wall, rv in writes[1:] if rv in first_decided]
    by_host = {h: sum(1 for s in sent if s.host == h) for h in HOSTS}
    both_ok = sum(1 for s in sent if s.host == "both.test" and s.status == 200)
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    print(
        f"\nload: {len(sent)} requests in {seconds:.0f} s by {clients} clients "
        f"({by_host}), {len(writes) - 1} flips; both.test 200: {both_ok}/{by_host['both.test']}; "
        f"mixed decisions: 0; write -> first proxy decision under it (ms clock, {len(lags)} "
        f"versions): p50 {statistics.median(lags) * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms; "
        f"longest a request sent after a write was still decided by the older version: "
        f"{max(stale) * 1000:.0f} ms ({len(stale) - 1} such requests)"
    )
    assert len(writes) > 50 and len(sent) > 1000
    assert len(lags) >= (len(writes) - 1) * 0.8  # nearly every version decided something
