"""The operator metrics, scraped from real processes while real traffic goes through them: a
sidecar (`egress-sidecar run`) with real upstreams, the injector (`egress-injector serve`)
answering real AdmissionReviews over HTTPS. Values must move as the traffic says."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.injector.test_injector_webhook import (
    Server as InjectorServer,
)
from tests.injector.test_injector_webhook import (
    admission_review,
    post,
    start_server,
    stop_server,
)
from tests.support.scrape import Scrape, scrape
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer

WEB, RAW, BLOCKED = "127.0.0.2", "127.0.0.6", "127.0.0.4"
UP, DOWN = 300_000, 200_000  # bytes through the raw tunnel, each way


class RawServer:
    """Reads exactly UP bytes, answers DOWN bytes, then waits for the client to close."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            got = 0
            while got < UP:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                got += len(chunk)
            conn.sendall(b"d" * DOWN)
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    sidecar: Sidecar
    web: UpstreamServer
    raw: RawServer

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.health_port}/metrics"

    def scrape(self) -> Scrape:
        return scrape(self.metrics_url)

    def proxies(self) -> dict[str, str]:
        return {"http": self.sidecar.proxy_url, "https": self.sidecar.proxy_url}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("metrics")
    web = UpstreamServer(WEB, label="web").start()
    raw = RawServer(RAW)
    allowlist = f"""
allow:
  - host: web.test
    ports: [{web.port}]
  - host: raw.test
    ports: [{raw.port}]
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={"web.test": WEB, "raw.test": RAW, "blocked.test": BLOCKED},
        args=["--allow-private-range", "127.0.0.0/8"],
    )
    yield World(sidecar, web, raw)
    sidecar.stop()
    web.stop()
    raw.close()


def wait_for(
    world_scrape: Callable[[], Scrape], check: Callable[[Scrape], bool], timeout: float = 10.0
) -> Scrape:
    """Scrapes until ``check`` holds (decisions are reported as the exchange ends, which may be
    just after the client has its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        now = world_scrape()
        if check(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def test_plain_http_bytes_are_counted_when_the_pooled_connection_closes(world: World) -> None:
    # First in the module: no other pooled connection to an upstream can close meanwhile.
    before = world.scrape()
    sent, received = "egress_upstream_sent_bytes_total", "egress_upstream_received_bytes_total"
    bodies = 0
    for i in range(4):
        r = requests.get(
            f"http://web.test:{world.web.port}/bytes/{i}", proxies=world.proxies(), timeout=5
        )
        assert r.status_code == 200
        bodies += len(r.content)
    # The pool keeps the upstream connection for 4 s idle; its bytes count when it closes.
    after = wait_for(
        world.scrape,
        lambda s: s.value(received, kind="http") - before.value(received, kind="http") >= bodies,
        timeout=15,
    )
    got = after.value(received, kind="http") - before.value(received, kind="http")
    assert got >= bodies  # bodies plus the response heads
    assert got < bodies + 4 * 400
    # Four request heads went up: each at least its request line.
    assert after.value(sent, kind="http") - before.value(sent, kind="http") >= 4 * len(
        "GET /bytes/0 HTTP/1.1\r\n"
    )


def test_request_durations_count_each_call_by_decision(world: World) -> None:
    before = world.scrape()
    name = "egress_request_duration_seconds_count"
    for _ in range(3):
        r = requests.get(
            f"http://web.test:{world.web.port}/get", proxies=world.proxies(), timeout=5
        )
        assert r.status_code == 200
    for _ in range(2):
        r = requests.get("http://blocked.test/x", proxies=world.proxies(), timeout=5)
        assert r.status_code == 403

    allow = {"decision": "allow", "capture": "explicit", "kind": "http"}
    deny = {"decision": "deny", "capture": "explicit", "kind": "http"}

    def moved(s: Scrape) -> bool:
        return (
            s.value(name, **allow) - before.value(name, **allow) >= 3
            and s.value(name, **deny) - before.value(name, **deny) >= 2
        )

    after = wait_for(world.scrape, moved)
    assert after.value(name, **allow) - before.value(name, **allow) == 3
    assert after.value(name, **deny) - before.value(name, **deny) == 2
    # The seconds went into the sum and into a finite bucket (a local call: well under 5 s).
    s_name = "egress_request_duration_seconds_sum"
    assert 0 < after.value(s_name, **allow) - before.value(s_name, **allow) < 15
    b_name = "egress_request_duration_seconds_bucket"
    assert after.value(b_name, le="5.0", **allow) - before.value(b_name, le="5.0", **allow) == 3
    # The decisions counter agrees.
    d_name = "egress_decisions_total"
    assert (
        after.value(d_name, decision="deny", capture="explicit")
        - before.value(d_name, decision="deny", capture="explicit")
        == 2
    )


def test_tunnel_gauges_duration_and_bytes(world: World) -> None:
    before = world.scrape()
    sock, head = world.sidecar.connect_tunnel(f"raw.test:{world.raw.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200"), head
        # The relay starts with the first flight (not a ClientHello: relayed as it is).
        sock.sendall(b"u" * UP)
        got = 0
        while got < DOWN:
            chunk = sock.recv(65536)
            assert chunk, "the tunnel closed early"
            got += len(chunk)
        # The server waits for the client to close: the tunnel is open while this scrapes.
        during = world.scrape()
        assert during.value("egress_open_tunnels") == 1
        assert during.value("egress_open_connections") >= 1
        time.sleep(0.3)  # a lifetime the histogram can see
    connect = {"decision": "allow", "capture": "explicit", "kind": "connect"}
    name = "egress_tunnel_duration_seconds_count"
    after = wait_for(
        world.scrape,
        lambda s: (
            s.value(name, **connect) - before.value(name, **connect) >= 1
            and s.value("egress_open_tunnels") == 0
        ),
    )
    assert after.value(name, **connect) - before.value(name, **connect) == 1
    assert after.value("egress_open_tunnels") == 0
    lifetime = after.value("egress_tunnel_duration_seconds_sum", **connect) - before.value(
        "egress_tunnel_duration_seconds_sum", **connect
    )
    assert 0.3 <= lifetime < 10
    # The kernel's counts of the upstream connection: the payload each way (a FIN may add one).
    sent = after.value("egress_upstream_sent_bytes_total", kind="connect") - before.value(
        "egress_upstream_sent_bytes_total", kind="connect"
    )
    received = after.value("egress_upstream_received_bytes_total", kind="connect") - before.value(
        "egress_upstream_received_bytes_total", kind="connect"
    )
    assert UP <= sent <= UP + 1
    assert DOWN <= received <= DOWN + 1
    # The connection is gone from the gauge too.
    closed = wait_for(
        world.scrape,
        lambda s: s.value("egress_open_connections") < during.value("egress_open_connections"),
    )
    assert closed.value("egress_open_connections") < during.value("egress_open_connections")


def test_denied_tunnel_has_a_request_duration_but_no_tunnel(world: World) -> None:
    before = world.scrape()
    sock, head = world.sidecar.connect_tunnel("blocked.test:443")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    deny = {"decision": "deny", "capture": "explicit", "kind": "connect"}
    name = "egress_request_duration_seconds_count"
    after = wait_for(world.scrape, lambda s: s.value(name, **deny) > before.value(name, **deny))
    assert after.value(name, **deny) - before.value(name, **deny) == 1
    t_name = "egress_tunnel_duration_seconds_count"
    assert after.value(t_name, **deny) == before.value(t_name, **deny) == 0


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_dropped_when_the_collector_does_not_answer(tmp_path: Path, protocol: str) -> None:
    # A collector that accepts connections (the kernel's backlog) and never answers: the
    # exporter waits on its first batch while the two-span queue fills. http/protobuf is the
    # lean pipeline, grpc the SDK's BatchSpanProcessor: both count their drops.
    hole = socket.create_server(("127.0.0.1", 0))
    try:
        sidecar = start_sidecar(
            tmp_path,
            allowlist="allow: []\n",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hole.getsockname()[1]}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_TIMEOUT": "20",
                "OTEL_BSP_MAX_QUEUE_SIZE": "2",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
                "OTEL_BSP_SCHEDULE_DELAY": "1",
            },
        )
        try:
            url = f"http://127.0.0.1:{sidecar.health_port}/metrics"
            assert scrape(url).value("egress_trace_spans_dropped_total") == 0
            proxies = {"http": sidecar.proxy_url}
            for i in range(20):
                r = requests.get(f"http://denied{i}.test/", proxies=proxies, timeout=5)
                assert r.status_code == 403
            after = wait_for(
                lambda: scrape(url), lambda s: s.value("egress_trace_spans_dropped_total") >= 10
            )
            # 20 spans, at most the queue's 2 and the batch in flight kept.
            assert 17 <= after.value("egress_trace_spans_dropped_total") <= 20
        finally:
            sidecar.stop()
    finally:
        hole.close()


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InjectorServer]:
    srv = start_server(tmp_path_factory.mktemp("injector"), "--drain-seconds", "0")
    yield srv
    stop_server(srv)


def injector_scrape(server: InjectorServer) -> Scrape:
    return scrape(f"https://127.0.0.1:{server.port}/metrics", context=server.context())


def _pod(inject: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "annotations": {"egress-sidecar.io/inject": inject}},
        "spec": {"containers": [{"name": "web", "image": "x"}]},
    }


def test_injector_admissions_by_result_with_latency(injector: InjectorServer) -> None:
    before = injector_scrape(injector)
    conn = injector.connect()
    try:
        for _ in range(2):
            status, _ = post(conn, "/mutate/pods", admission_review(_pod("true")))
            assert status == 200
        status, _ = post(conn, "/mutate/pods", admission_review(_pod("false")))
        assert status == 200
        status, _ = post(conn, "/mutate/pods", b"not a review")
        assert status == 400
    finally:
        conn.close()
    after = injector_scrape(injector)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    reviews = "egress_injector_reviews_total"
    count = "egress_injector_review_duration_seconds_count"
    assert delta(reviews, route="pods", outcome="injected") == 2
    assert delta(reviews, route="pods", outcome="skipped") == 1
    assert delta(reviews, route="pods", outcome="bad-request") == 1
    # Each answer's latency, under the same result.
    for outcome, n in (("injected", 2), ("skipped", 1), ("bad-request", 1)):
        assert delta(count, route="pods", outcome=outcome) == n
    assert 0 < delta("egress_injector_review_duration_seconds_sum", route="pods") < 5


# -- the Grafana dashboard (examples/grafana-dashboard.json) -----------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)")


@dataclass(frozen=True)
class Query:
    metrics: tuple[str, ...]  # series names the expression reads
    grouping: tuple[str, ...]  # labels of its by (...) clauses


def parse_promql(expr: str) -> Query:
    """The series an expression reads: identifiers left once strings, selectors, ranges and
    by-clauses are removed, that are not called (functions, aggregations are)."""
    text = _STRING.sub('""', expr)
    grouping = tuple(
        label.strip() for group in _GROUPING.findall(text) for label in group.split(",")
    )
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _SELECTOR.sub(" ", text)))
    metrics = []
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        metrics.append(match.group())
    return Query(tuple(metrics), tuple(g for g in grouping if g))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""
    doc = json.loads(DASHBOARD.read_text())
    found = []
    for panel in doc["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']}", var["definition"]))
    return found


def test_promql_parser_finds_metric_names() -> None:
    q = parse_promql(
        'histogram_quantile(0.99, sum by (le, kind) (rate(a_bucket{x=~"$y", z="sum(b)"}[5m])))'
    )
    assert q == Query(("a_bucket",), ("le", "kind"))
    assert parse_promql("min(up) + sum(rate(c_total[1m]))").metrics == ("up", "c_total")


def test_dashboard_names_only_metrics_the_sidecar_and_injector_export(
    world: World, injector: InjectorServer
) -> None:
    # Names from the real processes' /metrics, with traffic through both (samples carry the
    # labels the panels group by).
    requests.get(f"http://web.test:{world.web.port}/get", proxies=world.proxies(), timeout=5)
    conn = injector.connect()
    try:
        post(conn, "/mutate/pods", admission_review(_pod("true")))
    finally:
        conn.close()
    scrapes = [wait_for(world.scrape, lambda s: True), injector_scrape(injector)]
    exported = set().union(*(s.series_names() for s in scrapes))
    labels: dict[str, set[str]] = {}
    for s in scrapes:
        for sample in s.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)

    queries = dashboard_queries()
    assert len(queries) >= 15
    read: set[str] = set()
    for where, expr in queries:
        lv = _LABEL_VALUES.fullmatch(expr)
        q = Query((lv.group(1),), ()) if lv else parse_promql(expr)
        assert q.metrics, f"{where}: no metric in {expr!r}"
        for name in q.metrics:
            assert name in exported, f"{where}: {name} is not exported ({expr!r})"
            read.add(name)
            # Grouping labels (le aside) must be the metric's own, where it has samples.
            own = labels.get(name)
            if own:
                missing = set(q.grouping) - own - {"le", "namespace", "pod"}
                assert not missing, f"{where}: {name} has no label {missing}"
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in q.metrics) and "le" in q.grouping, expr
    # What the issue asks the dashboard to show is all there.
    for wanted in (
        "egress_decisions_total",
        "egress_request_duration_seconds_bucket",
        "egress_tunnel_duration_seconds_bucket",
        "egress_upstream_sent_bytes_total",
        "egress_upstream_received_bytes_total",
        "egress_open_connections",
        "egress_open_tunnels",
        "egress_trace_spans_dropped_total",
        "egress_dns_queries_total",
        "egress_injector_reviews_total",
        "egress_injector_review_duration_seconds_bucket",
    ):
        assert wanted in read, f"the dashboard does not show {wanted}"
