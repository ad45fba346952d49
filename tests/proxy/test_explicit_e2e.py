"""End to end through a running sidecar: real clients, real upstreams with their own certificates,
real OTLP export decoded with opentelemetry-proto."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests

from tests.support.otlp import SPAN_KIND_CLIENT, STATUS_ERROR, OtlpHttpReceiver, ReceivedSpan
from tests.support.sidecar import Sidecar, free_port, start_sidecar
from tests.support.tls import TestCA
from tests.support.upstream import UpstreamServer

API, WEB, BLOCKED, CLOSED = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
CLOSED_PORT = free_port(CLOSED)  # nothing listens there


@dataclass
class World:
    sidecar: Sidecar
    api: UpstreamServer  # HTTPS, certificate for api.test
    api_fingerprint: str
    web: UpstreamServer  # plain HTTP
    blocked_http: UpstreamServer
    blocked_https: UpstreamServer
    otlp: OtlpHttpReceiver
    ca_file: Path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    test_ca: TestCA,
    ca_file: Path,
    otlp_http: OtlpHttpReceiver,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("explicit")
    api_cert = test_ca.issue("api.test")
    api = UpstreamServer(API, label="api", tls=api_cert.write(tmp, "api")).start()
    web = UpstreamServer(WEB, label="web").start()
    blocked_http = UpstreamServer(BLOCKED, label="blocked-http").start()
    blocked_https = UpstreamServer(
        BLOCKED, label="blocked-https", tls=test_ca.issue("blocked.test").write(tmp, "blocked")
    ).start()
    allowlist = f"""
allow:
  - host: api.test
    ports: [{api.port}]
  - host: ghost.test
    ports: [{web.port}]
  - host: closed.test
    ports: [{CLOSED_PORT}]
  - host: web.test
    ports: [{web.port}]
    methods: [GET, HEAD]
    paths: ["/get", "/status/*"]
deny:
  - denied.test
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={
            "api.test": API,
            "web.test": WEB,
            "blocked.test": BLOCKED,
            "denied.test": BLOCKED,
            "closed.test": CLOSED,
        },
        args=["--allow-private-range", "127.0.0.0/8"],
        env={
            **otlp_http.exporter_env,
            "OTEL_SERVICE_NAME": "checkout",
            "POD_NAME": "checkout-7d9f-abcde",
            "POD_NAMESPACE": "shop",
            "EGRESS_WORKLOAD_KIND": "Deployment",
            "EGRESS_WORKLOAD_NAME": "checkout",
        },
    )
    yield World(
        sidecar,
        api,
        api_cert.fingerprint_sha256,
        web,
        blocked_http,
        blocked_https,
        otlp_http,
        ca_file,
    )
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    for server in (api, web, blocked_http, blocked_https):
        server.stop()


def _spans(world: World, host: str, count: int = 1) -> list[ReceivedSpan]:
    return world.otlp.sink.wait_for(lambda s: s.attributes.get("server.address") == host, count)


# -- allowed HTTPS passes through untouched ---------------------------------------------------


def test_https_tunnel_shows_the_upstreams_own_certificate(world: World) -> None:
    sock, head = world.sidecar.connect_tunnel(f"api.test:{world.api.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(world.ca_file))
    with context.wrap_socket(sock, server_hostname="api.test") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert hashlib.sha256(der).hexdigest() == world.api_fingerprint
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := tls.recv(65536):
            body += chunk
    assert b'"upstream": "api"' in body


def test_curl_https_through_the_proxy_verifies_against_the_upstream_ca(world: World) -> None:
    url = f"https://api.test:{world.api.port}/curl"
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(world.ca_file),
            "-x",
            world.sidecar.proxy_url,
            url,
            "-w",
            "\n%{http_code} %{ssl_verify_result}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("200 0")


def test_requests_and_httpx_reach_the_allowed_https_host(world: World) -> None:
    url = f"https://api.test:{world.api.port}/clients"
    proxies = {"https": world.sidecar.proxy_url, "http": world.sidecar.proxy_url}
    r = requests.get(url, proxies=proxies, verify=str(world.ca_file), timeout=10)
    assert r.status_code == 200 and r.json()["upstream"] == "api"
    with httpx.Client(
        proxy=world.sidecar.proxy_url, verify=ssl.create_default_context(cafile=str(world.ca_file))
    ) as client:
        h = client.get(url, timeout=10)
    assert h.status_code == 200 and h.json()["path"] == "/clients"


def test_an_allowed_tunnel_is_traced_once_with_passthrough(world: World) -> None:
    sock, head = world.sidecar.connect_tunnel(f"api.test:{world.api.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    span = _spans(world, "api.test")[-1]
    assert span.name == "CONNECT"
    assert span.kind == SPAN_KIND_CLIENT
    assert span.status_code != STATUS_ERROR
    a = span.attributes
    assert a["egress.decision"] == "allow"
    assert a["egress.reason"] == "matched allow rule"
    assert a["egress.rule"] == f"{{host: api.test, ports: [{world.api.port}]}}"
    assert a["egress.capture"] == "explicit"
    assert a["egress.tls.passthrough"] is True
    assert a["egress.policy.source"].startswith("file:")
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", a["egress.policy.version"])
    assert a["server.port"] == world.api.port
    assert a["network.peer.address"] == API
    assert a["http.request.method"] == "CONNECT"
    assert a["http.response.status_code"] == 200
    assert "error.type" not in a
    assert span.resource["service.name"] == "checkout"
    assert span.resource["k8s.namespace.name"] == "shop"
    assert span.resource["k8s.pod.name"] == "checkout-7d9f-abcde"
    assert span.resource["k8s.deployment.name"] == "checkout"


def test_an_allowed_tunnel_to_a_closed_port_is_answered_502_and_traced_as_an_error(
    world: World,
) -> None:
    sock, head = world.sidecar.connect_tunnel(f"closed.test:{CLOSED_PORT}")
    sock.close()
    text = head.decode()
    assert text.startswith("HTTP/1.1 502"), text  # never 200: the upstream was never up
    assert "x-egress-decision: allow" in text
    assert "x-egress-reason: upstream connection refused" in text
    span = _spans(world, "closed.test")[-1]
    assert span.attributes["egress.decision"] == "allow"
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "connection_refused"
    assert span.attributes["http.response.status_code"] == 502
    assert "111" in span.attributes["egress.upstream.error"]
    line = world.sidecar.wait_decisions(lambda d: d.get("host") == "closed.test")[-1]
    assert line["decision"] == "allow" and "111" in line["error"]


# -- denials ---------------------------------------------------------------------------------


def test_denied_connect_answers_403_and_never_reaches_the_destination(world: World) -> None:
    before = world.blocked_https.seen.connections
    sock, head = world.sidecar.connect_tunnel(f"blocked.test:{world.blocked_https.port}")
    sock.close()
    text = head.decode()
    assert text.startswith("HTTP/1.1 403")
    assert "x-egress-decision: deny" in text
    assert "x-egress-reason: no allow rule matches" in text
    body = subprocess.run(
        [
            "curl",
            "-s",
            "-x",
            world.sidecar.proxy_url,
            "--proxy-header",
            "X: 1",
            f"https://blocked.test:{world.blocked_https.port}/",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert body.stdout == "403"
    assert world.blocked_https.seen.connections == before


def test_denied_plain_http_body_names_host_port_reason_and_policy(world: World) -> None:
    before = world.blocked_http.seen.connections
    r = requests.get(
        f"http://denied.test:{world.blocked_http.port}/x",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == 403
    assert r.headers["x-egress-decision"] == "deny"
    assert r.headers["x-egress-reason"] == "matched deny rule"
    line = r.text
    assert line.count("\n") == 1
    assert f"denied.test:{world.blocked_http.port}" in line
    assert "matched deny rule" in line and "policy file:" in line
    assert world.blocked_http.seen.connections == before
    span = _spans(world, "denied.test")[-1]
    assert span.name == "GET"
    assert span.status_code == STATUS_ERROR
    assert span.attributes["egress.decision"] == "deny"
    assert span.attributes["error.type"] == "egress_denied"
    assert span.attributes["egress.rule"] == "denied.test"
    assert span.attributes["http.response.status_code"] == 403
    assert span.attributes["url.full"] == f"http://denied.test:{world.blocked_http.port}/x"


def test_a_host_header_disagreeing_with_the_url_is_replaced_by_the_decided_host(
    world: World,
) -> None:
    """A shared server would route by Host: the upstream must see the host that was decided."""
    r = requests.get(
        f"http://web.test:{world.web.port}/get",
        headers={"Host": "denied.test"},
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json()["headers"]["host"] == f"web.test:{world.web.port}"


def test_an_https_request_target_without_connect_is_refused(world: World) -> None:
    before = world.api.seen.connections
    sock = socket.create_connection(("127.0.0.1", world.sidecar.explicit_port), timeout=10)
    target = f"https://api.test:{world.api.port}/plain"
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    text = answer.decode()
    assert text.startswith("HTTP/1.1 403")
    assert "x-egress-reason: invalid destination" in text
    assert "CONNECT" in text.split("\r\n\r\n", 1)[1]
    assert world.api.seen.connections == before


def test_hop_by_hop_fields_and_proxy_credentials_stop_at_the_proxy(world: World) -> None:
    r = requests.get(
        f"http://web.test:{world.web.port}/get",
        headers={
            "Proxy-Authorization": "Basic dXNlcjpzZWNyZXQ=",
            "Proxy-Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "only for the next hop",
            "X-End-To-End": "kept",
        },
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == 200
    seen = r.json()["headers"]
    for name in ("proxy-authorization", "proxy-connection", "keep-alive", "x-hop"):
        assert name not in seen, (name, seen)
    assert seen["x-end-to-end"] == "kept"


def test_an_agreeing_host_header_is_passed_unchanged(world: World) -> None:
    r = requests.get(
        f"http://web.test:{world.web.port}/get",
        headers={"Host": f"WEB.test:{world.web.port}"},
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.json()["headers"]["host"] == f"WEB.test:{world.web.port}"


@pytest.mark.parametrize(
    "host", ["WEB.TEST", "web.test.", "Web.Test."], ids=["upper", "fqdn-dot", "mixed-dot"]
)
def test_host_spellings_of_an_allowed_host_reach_it(world: World, host: str) -> None:
    r = requests.get(
        f"http://{host}:{world.web.port}/get",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["upstream"] == "web"


def test_an_allowed_host_that_does_not_resolve_fails_closed_with_its_reason(world: World) -> None:
    r = requests.get(
        f"http://ghost.test:{world.web.port}/x",  # allowed, but in no hosts file and no DNS
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == 403
    assert r.headers["x-egress-reason"] == "host does not resolve"
    assert "ghost.test" in r.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/get", 200),
        ("HEAD", "/status/418", 200),
        ("GET", "/status/", 200),
        ("POST", "/get", 403),
        ("GET", "/admin", 403),
        ("GET", "/get/more", 403),
    ],
)
def test_l7_methods_and_paths_are_checked_on_plain_http(
    world: World, method: str, path: str, status: int
) -> None:
    r = requests.request(
        method,
        f"http://web.test:{world.web.port}{path}?q=1",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    assert r.status_code == status


# -- plain HTTP trace context ------------------------------------------------------------------


def test_plain_http_continues_the_callers_trace_and_hands_the_upstream_our_span(
    world: World,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    r = httpx.get(
        f"http://web.test:{world.web.port}/get",
        headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
        proxy=world.sidecar.proxy_url,
        timeout=10,
    )
    assert r.status_code == 200
    upstream_tp = r.json()["headers"]["traceparent"]
    _, up_trace, up_parent, _flags = upstream_tp.split("-")
    assert up_trace == trace_id
    span = world.otlp.sink.wait_for(lambda s: s.trace_id == trace_id)[0]
    assert span.parent_span_id == caller_span
    assert span.span_id == up_parent
    assert span.name == "GET"
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["url.full"] == f"http://web.test:{world.web.port}/get"


def test_url_credentials_are_redacted_in_spans(world: World) -> None:
    requests.get(
        f"http://user:secret@web.test:{world.web.port}/get?sig=abc&x=1",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    span = world.otlp.sink.wait_for(lambda s: "sig=" in str(s.attributes.get("url.full", "")))[-1]
    assert "secret" not in span.attributes["url.full"]
    assert "abc" not in span.attributes["url.full"]


# -- logs, health, metrics -------------------------------------------------------------------


def test_each_decision_is_one_json_line_on_stdout(world: World) -> None:
    requests.get(
        f"http://web.test:{world.web.port}/status/204",
        proxies={"http": world.sidecar.proxy_url},
        timeout=10,
    )
    lines = world.sidecar.wait_decisions(lambda d: d.get("url", "").endswith("/status/204"))
    assert len(lines) == 1
    d = lines[0]
    assert d["decision"] == "allow" and d["protocol"] == "GET" and d["status"] == 200
    assert d["host"] == "web.test" and d["address"] == WEB
    # nothing but decisions on stdout
    assert all(
        line.startswith('{"ts"') and '"msg":"egress decision"' in line
        for line in world.sidecar.stdout
    )


def test_ready_reports_the_policy_version_and_metrics_count_decisions(world: World) -> None:
    status, body = world.sidecar.health("/healthz/ready")
    assert status == 200
    assert '"version": "sha256:' in body
    status, live = world.sidecar.health("/healthz/live")
    assert (status, live) == (200, "ok\n")
    status, metrics = world.sidecar.health("/metrics")
    assert status == 200
    assert re.search(
        r'egress_policy_info\{source="file:[^"]+",version="sha256:[0-9a-f]{12}"\} 1', metrics
    )
    assert re.search(
        r'egress_decisions_total\{capture="explicit",decision="deny",'
        r'reason="no allow rule matches"\} [1-9]',
        metrics,
    )
