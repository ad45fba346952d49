"""The destinations summary (/debug/destinations): its bounds, its JSON, and a real sidecar
answering it after real calls through it."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sidecar.destinations import ENTRY_OVERHEAD, DestinationSummary, SeenDestination
from sidecar.policy.model import Decision, Reason, Verdict
from sidecar.record import Capture
from tests.support.records import decision_record
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


def test_same_destination_counts_with_first_and_last_seen() -> None:
    clock = Clock()
    summary = DestinationSummary(clock=clock)
    summary.add(decision_record(peer_address="198.18.0.1"))
    clock.tick(65)
    summary.add(decision_record(peer_address="198.18.0.2"))
    [seen] = summary.snapshot()
    assert seen == SeenDestination(
        host="web.test",
        port=80,
        capture="explicit",
        protocol="GET",
        decision="allow",
        reason="matched allow rule",
        rule="web.test",
        count=2,
        first_seen="2026-09-21T14:13:20Z",
        last_seen="2026-09-21T14:14:25Z",
        address="198.18.0.2",
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 8080),
        ("capture", Capture.TRANSPARENT),
        ("protocol", "POST"),
        ("decision", Decision(Verdict.DENY, Reason.NO_MATCH)),
        ("decision", Decision(Verdict.AUDIT, Reason.NO_MATCH)),
        ("decision", Decision(Verdict.ALLOW, Reason.MATCHED_ALLOW, "*.test")),
        ("host", "api.test"),
    ],
)
def test_each_key_field_makes_its_own_entry(field: str, value: object) -> None:
    summary = DestinationSummary()
    summary.add(decision_record())
    summary.add(decision_record(**{field: value}))
    assert len(summary) == 2


def test_an_address_only_flow_is_named_by_its_address_and_one_without_is_skipped() -> None:
    summary = DestinationSummary()
    summary.add(decision_record(host=None, protocol="TCP", peer_address="198.18.0.9", port=5432))
    summary.add(decision_record(host=None, protocol="TLS", original_address="198.18.0.8"))
    summary.add(decision_record(host=None, protocol="TLS"))
    assert sorted(s.host for s in summary.snapshot()) == ["198.18.0.8", "198.18.0.9"]


def test_bounded_in_entries_least_recently_seen_evicted_first() -> None:
    clock = Clock()
    summary = DestinationSummary(max_entries=16, clock=clock)
    for i in range(16):
        summary.add(decision_record(host=f"h{i}.test"))
        clock.tick()
    summary.add(decision_record(host="h0.test"))  # h0 is now the most recent, h1 the oldest
    clock.tick()
    summary.add(decision_record(host="new.test"))
    hosts = {s.host for s in summary.snapshot()}
    # One batch (an eighth: 2 entries) went: the two least recently seen, h1 and h2.
    assert hosts == {"h0.test", "new.test"} | {f"h{i}.test" for i in range(3, 16)}
    assert summary.evicted == 2
    for i in range(1000):
        summary.add(decision_record(host=f"more{i}.test"))
        clock.tick()
    assert len(summary) <= 16
    assert summary.evicted == 1000 + 17 - len(summary)
    assert "more999.test" in {s.host for s in summary.snapshot()}


def test_bounded_in_bytes_whatever_the_hosts_length() -> None:
    summary = DestinationSummary(max_entries=10_000, max_bytes=64 * 1024)
    for i in range(2000):
        summary.add(decision_record(host=f"{i}-" + "x" * 4000 + ".test"))
    assert summary.estimated_bytes <= 64 * 1024
    assert 1 <= len(summary) <= 64 * 1024 // (ENTRY_OVERHEAD + 4000)
    summary.add(decision_record(host="y" * 200_000))  # larger than the whole budget
    assert summary.estimated_bytes <= 64 * 1024 or len(summary) == 1


def test_json_shape_most_recent_first_and_round_trip() -> None:
    clock = Clock()
    summary = DestinationSummary(max_entries=8, clock=clock)
    summary.add(decision_record(host="old.test"))
    clock.tick()
    summary.add(
        decision_record(
            host="api.test",
            port=443,
            protocol="CONNECT",
            decision=Decision(Verdict.DENY, Reason.MATCHED_DENY, "api.test"),
            peer_address="198.18.0.5",
        )
    )
    doc = json.loads(json.dumps(summary.to_json()))
    assert doc == {
        "since": "2026-09-21T14:13:20Z",
        "max_entries": 8,
        "entries": 2,
        "evicted": 0,
        "destinations": [
            {
                "host": "api.test",
                "port": 443,
                "capture": "explicit",
                "protocol": "CONNECT",
                "decision": "deny",
                "reason": "matched deny rule",
                "rule": "api.test",
                "address": "198.18.0.5",
                "count": 1,
                "first_seen": "2026-09-21T14:13:21Z",
                "last_seen": "2026-09-21T14:13:21Z",
            },
            {
                "host": "old.test",
                "port": 80,
                "capture": "explicit",
                "protocol": "GET",
                "decision": "allow",
                "reason": "matched allow rule",
                "rule": "web.test",
                "address": None,
                "count": 1,
                "first_seen": "2026-09-21T14:13:20Z",
                "last_seen": "2026-09-21T14:13:20Z",
            },
        ],
    }
    assert [SeenDestination.from_json(d) for d in doc["destinations"]] == summary.snapshot()
    with pytest.raises(ValueError, match="no 'port'"):
        SeenDestination.from_json({k: v for k, v in doc["destinations"][0].items() if k != "port"})
    with pytest.raises(ValueError, match="wrong type"):
        SeenDestination.from_json({**doc["destinations"][0], "count": "3"})


def test_snapshots_while_another_thread_adds() -> None:
    """The health thread reads while the event loop writes: no error, nothing beyond the bound."""
    summary = DestinationSummary(max_entries=64)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                assert len(summary.snapshot()) <= 64
        except BaseException as err:  # reported below
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20_000):
            summary.add(decision_record(host=f"h{i % 500}.test"))
    finally:
        stop.set()
        reader.join(10)
    assert not errors
    assert len(summary) <= 64


def test_no_destination_summary_at_all_is_a_valid_setting() -> None:
    with pytest.raises(ValueError):
        DestinationSummary(max_entries=0)


# -- a real sidecar ----------------------------------------------------------------------------

WEB, API = "127.0.0.3", "127.0.0.2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, UpstreamServer]]:
    tmp = tmp_path_factory.mktemp("destinations")
    web = UpstreamServer(WEB, label="web").start()
    allowlist = f"""
allow:
  - host: web.test
    ports: [{web.port}]
deny:
  - denied.test
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={"web.test": WEB, "denied.test": WEB, "other.test": API},
        args=["--allow-private-range", "127.0.0.0/8", "--destinations-max-entries", "50"],
    )
    yield sidecar, web
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    web.stop()


def _destinations(sidecar: Sidecar) -> dict[str, object]:
    code, body = sidecar.health("/debug/destinations")
    assert code == 200, body
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def test_a_real_sidecar_serves_what_it_decided_without_paths_or_queries(
    served: tuple[Sidecar, UpstreamServer],
) -> None:
    sidecar, web = served
    proxies = {"http": sidecar.proxy_url, "https": sidecar.proxy_url}
    secret = "tok3n-s3cr3t"
    for _ in range(3):
        r = requests.get(
            f"http://web.test:{web.port}/private/path?access_token={secret}",
            proxies=proxies,
            timeout=10,
        )
        assert r.status_code == 200
    assert (
        requests.get(f"http://denied.test:{web.port}/x", proxies=proxies, timeout=10).status_code
        == 403
    )
    sock, head = sidecar.connect_tunnel("other.test:443")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    sidecar.wait_decisions(count=5)
    doc = _destinations(sidecar)
    assert doc["max_entries"] == 50
    assert doc["evicted"] == 0
    rows = doc["destinations"]
    assert isinstance(rows, list)
    got = {
        (d["host"], d["port"], d["protocol"], d["decision"], d["reason"], d["rule"], d["count"])
        for d in rows
    }
    assert got == {
        (
            "web.test",
            web.port,
            "GET",
            "allow",
            "matched allow rule",
            f"{{host: web.test, ports: [{web.port}]}}",
            3,
        ),
        ("denied.test", web.port, "GET", "deny", "matched deny rule", "denied.test", 1),
        ("other.test", 443, "CONNECT", "deny", "no allow rule matches", None, 1),
    }
    assert all(d["capture"] == "explicit" for d in rows)
    assert next(d for d in rows if d["host"] == "web.test")["address"] == WEB
    assert secret not in json.dumps(doc)
    assert "/private/path" not in json.dumps(doc)


def test_a_real_sidecar_keeps_its_summary_bounded(served: tuple[Sidecar, UpstreamServer]) -> None:
    sidecar, _ = served
    for i in range(80):  # bounded: 80 CONNECTs refused by name, no upstream contacted
        sock, head = sidecar.connect_tunnel(f"h{i}.other.test:443")
        sock.close()
        assert head.startswith(b"HTTP/1.1 403")
    sidecar.wait_decisions(lambda d: str(d.get("host", "")).startswith("h79."), count=1)
    doc = _destinations(sidecar)
    assert isinstance(doc["destinations"], list)
    assert len(doc["destinations"]) <= 50
    assert isinstance(doc["evicted"], int) and doc["evicted"] >= 30
    assert doc["destinations"][0]["host"] == "h79.other.test"


def test_the_summary_is_read_only(served: tuple[Sidecar, UpstreamServer]) -> None:
    sidecar, _ = served
    url = f"http://127.0.0.1:{sidecar.health_port}/debug/destinations"
    request = urllib.request.Request(url, data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 501


def test_turned_off_it_is_not_served(tmp_path: Path) -> None:
    sidecar = start_sidecar(
        tmp_path, allowlist="allow: [web.test]\n", args=["--destinations-max-entries", "0"]
    )
    try:
        assert sidecar.health("/debug/destinations")[0] == 404
    finally:
        assert sidecar.stop() == 0


def test_the_mitmproxy_engine_feeds_it_too(tmp_path: Path) -> None:
    """Both tiers report through the same Reporter: the reference engine's decisions count."""
    web = UpstreamServer(WEB, label="web").start()
    sidecar = start_sidecar(
        tmp_path,
        allowlist=f"allow:\n  - host: web.test\n    ports: [{web.port}]\n",
        hosts={"web.test": WEB},
        args=["--allow-private-range", "127.0.0.0/8", "--engine", "mitmproxy"],
    )
    try:
        proxies = {"http": sidecar.proxy_url}
        for _ in range(2):
            r = requests.get(f"http://web.test:{web.port}/x?k=v", proxies=proxies, timeout=20)
            assert r.status_code == 200
        sidecar.wait_decisions(count=2)
        rows = _destinations(sidecar)["destinations"]
        assert isinstance(rows, list)
        assert [(d["host"], d["protocol"], d["decision"], d["count"]) for d in rows] == [
            ("web.test", "GET", "allow", 2)
        ]
    finally:
        assert sidecar.stop() == 0
        web.stop()


def test_the_dns_listeners_query_decisions_are_summarised(tmp_path: Path) -> None:
    """A query no rule names is answered NXDOMAIN without reaching a resolver; the summary
    holds it (protocol DNS, port 53) and `kubectl egress suggest` says it cannot guess a port."""
    import dns.message
    import dns.query
    import dns.rcode

    from sidecar.kubectl import plan
    from tests.support.sidecar import free_ports

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.13.53\n")  # never asked: the query is denied by name
    port, *taken = free_ports(4)  # the DNS port apart from the sidecar's three
    sidecar = start_sidecar(
        tmp_path / "sidecar",
        ports=(taken[0], taken[1], taken[2]),
        allowlist="allow: [web.test]\n",
        args=["--dns-listen", f"127.0.0.1:{port}", "--dns-resolv-conf", str(resolv)],
    )
    try:
        query = dns.message.make_query("unknown.example", "A")
        answer = dns.query.udp(query, "127.0.0.1", timeout=5, port=port)
        assert answer.rcode() == dns.rcode.NXDOMAIN
        sidecar.wait_decisions(lambda d: d.get("protocol") == "DNS")
        rows = _destinations(sidecar)["destinations"]
        assert isinstance(rows, list)
        [row] = rows
        assert (row["host"], row["port"], row["capture"], row["protocol"], row["decision"]) == (
            "unknown.example",
            53,
            "transparent",
            "DNS",
            "deny",
        )
        seen = [SeenDestination.from_json(r) for r in rows]
        suggestion = plan.suggest(None, None, plan.merge_seen([seen]))
        assert suggestion.added == []
        assert [s.destination for s in suggestion.skipped] == ["unknown.example (DNS)"]
    finally:
        assert sidecar.stop() == 0
