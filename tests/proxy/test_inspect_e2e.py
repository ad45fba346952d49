"""HTTPS inspection (inspect: true) end to end through a running sidecar, explicit CONNECT: real
clients trusting the egress CA (curl, requests, httpx with HTTP/2, openssl s_client), real
HTTPS upstreams with their own certificate chain (HTTP/1.1 and HTTP/2 only), real OTLP export."""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.h2upstream import H2Upstream
from tests.support.otlp import STATUS_ERROR, OtlpHttpReceiver, ReceivedSpan
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.tls import TestCA
from tests.support.upstream import UpstreamServer

API, H2, BAD, PLAIN = "127.0.12.1", "127.0.12.2", "127.0.12.3", "127.0.12.4"
EGRESS_CA_NAME = "egress-sidecar inspection CA (test)"


@dataclass
class World:
    sidecar: Sidecar
    api: UpstreamServer  # HTTP/1.1, certificate by the test CA, inspected
    h2: H2Upstream  # HTTP/2 only, inspected
    bad: UpstreamServer  # a certificate no trusted CA issued, inspected
    plain: UpstreamServer  # not inspected
    plain_fingerprint: str
    egress_ca: Path  # what the app trusts: the egress CA
    bundle: Path  # the egress CA and the test CA (the passthrough host's issuer)
    upstream_ca: Path  # the test CA alone: an app that does not trust the egress CA
    otlp: OtlpHttpReceiver
    ca_dir: Path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    test_ca: TestCA,
    ca_file: Path,
    otlp_http: OtlpHttpReceiver,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("inspect")
    egress = TestCA(EGRESS_CA_NAME)
    ca_dir = egress.write_tls_dir(tmp / "ca")
    egress_ca = egress.write_ca(tmp / "egress-ca.pem")
    bundle = tmp / "bundle.pem"
    bundle.write_bytes(egress.cert_pem + test_ca.cert_pem)
    api = UpstreamServer(
        API, label="api", tls=test_ca.issue("api.inspected.test").write(tmp, "api")
    )
    h2_cert, h2_key = test_ca.issue("h2.inspected.test").write(tmp, "h2")
    h2 = H2Upstream(H2, h2_cert, h2_key)
    rogue = TestCA("rogue CA")
    bad = UpstreamServer(BAD, label="bad", tls=rogue.issue("bad.inspected.test").write(tmp, "bad"))
    plain_cert = test_ca.issue("plain.test")
    plain = UpstreamServer(PLAIN, label="plain", tls=plain_cert.write(tmp, "plain"))
    for server in (api, bad, plain):
        server.start()
    allowlist = f"""
allow:
  - host: api.inspected.test
    ports: [{api.port}]
    inspect: true
    methods: [GET, POST]
    paths: ["/v1/*"]
  - {{host: h2.inspected.test, ports: [{h2.port}], inspect: true, methods: [GET]}}
  - {{host: bad.inspected.test, ports: [{bad.port}], inspect: true}}
  - {{host: plain.test, ports: [{plain.port}]}}
deny:
  - {{host: api.inspected.test, paths: ["/v1/admin/*"]}}
"""
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={
            "api.inspected.test": API,
            "h2.inspected.test": H2,
            "bad.inspected.test": BAD,
            "plain.test": PLAIN,
        },
        args=[
            "--allow-private-range",
            "127.0.0.0/8",
            "--inspect-ca-dir",
            str(ca_dir),
            "--inspect-upstream-ca-file",
            str(ca_file),
        ],
        env={**otlp_http.exporter_env, "OTEL_SERVICE_NAME": "checkout"},
    )
    yield World(
        sidecar,
        api,
        h2,
        bad,
        plain,
        plain_cert.fingerprint_sha256,
        egress_ca,
        bundle,
        ca_file,
        otlp_http,
        ca_dir,
    )
    assert sidecar.stop() == 0, sidecar.stderr[-20:]
    for server in (api, bad, plain):
        server.stop()
    h2.stop()


def _url(host: str, port: int, path: str) -> str:
    return f"https://{host}:{port}{path}"


def _curl(world: World, *args: str) -> tuple[int, dict[str, str], str, str]:
    """(status, headers, body, http version) of one curl through the explicit proxy."""
    proc = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", "-x", world.sidecar.proxy_url, *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout  # text mode: line ends read as "\n"
    # The proxy's own "200 Connection established" comes first.
    if text.startswith("HTTP/1.1 200 Connection established"):
        text = text.partition("\n\n")[2]
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    version, status = lines[0].split(" ")[:2]
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    return int(status), headers, body, version


def _trusting(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def _peer_cert(world: World, host: str, port: int, cafile: Path) -> x509.Certificate:
    sock, head = world.sidecar.connect_tunnel(f"{host}:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(cafile))
    with context.wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def _spans(world: World, pred: object, count: int = 1) -> list[ReceivedSpan]:
    return world.otlp.sink.wait_for(pred, count)  # type: ignore[arg-type]


# -- allowed requests inside inspected TLS -----------------------------------------------------


def test_curl_http1_allowed_request_reaches_the_upstream(world: World) -> None:
    before = len(world.api.seen.requests)
    url = _url("api.inspected.test", world.api.port, "/v1/charges?amount=1")
    status, _, body, version = _curl(
        world, "--cacert", str(world.egress_ca), "--http1.1", "-X", "POST", "-d", "a=1", url
    )
    assert (status, version) == (200, "HTTP/1.1"), body
    assert json.loads(body)["path"] == "/v1/charges?amount=1"
    seen = world.api.seen.requests[before:]
    assert [(r["method"], r["path"]) for r in seen] == [("POST", "/v1/charges?amount=1")]
    # The upstream sees a traceparent naming our span, and the Host the policy decided.
    assert seen[0]["headers"]["host"] == f"api.inspected.test:{world.api.port}"
    assert seen[0]["headers"]["traceparent"].startswith("00-")
    span = _spans(
        world,
        lambda s: s.name == "POST" and s.attributes.get("server.address") == "api.inspected.test",
    )[0]
    a = span.attributes
    assert a["egress.tls.inspected"] is True and a["egress.tls.passthrough"] is False
    assert a["http.request.method"] == "POST"
    assert a["url.full"] == url
    assert a["http.response.status_code"] == 200
    assert a["egress.decision"] == "allow"
    assert seen[0]["headers"]["traceparent"].split("-")[2] == span.span_id


def test_leaf_is_issued_by_the_egress_ca_for_the_host(world: World) -> None:
    cert = _peer_cert(world, "api.inspected.test", world.api.port, world.egress_ca)
    issuer = cert.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert issuer == EGRESS_CA_NAME
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["api.inspected.test"]
    # Short-lived: a day from now at most (mitmproxy backdates the start for clock skew).
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= 3 * 86400 + 60
    # Cached: the same leaf for the next connection.
    again = _peer_cert(world, "api.inspected.test", world.api.port, world.egress_ca)
    assert again.serial_number == cert.serial_number


def test_requests_library(world: World) -> None:
    proxies = {"https": world.sidecar.proxy_url}
    url = _url("api.inspected.test", world.api.port, "/v1/customers/c1")
    resp = requests.get(url, proxies=proxies, verify=str(world.egress_ca), timeout=10)
    assert resp.status_code == 200 and resp.json()["method"] == "GET"
    denied = requests.put(url, proxies=proxies, verify=str(world.egress_ca), timeout=10)
    assert denied.status_code == 403
    assert denied.headers["x-egress-decision"] == "deny"


def test_httpx_http2_to_an_h2_upstream(world: World) -> None:
    before = len(world.h2.seen.requests)
    with httpx.Client(
        proxy=world.sidecar.proxy_url, verify=_trusting(world.egress_ca), http2=True, timeout=10
    ) as client:
        url = _url("h2.inspected.test", world.h2.port, "/items?x=1")
        responses = [client.get(url) for _ in range(3)]
        denied = client.post(url, content=b"x")
    for resp in responses:
        assert resp.status_code == 200 and resp.http_version == "HTTP/2"
        assert resp.json()["protocol"] == "h2"
    assert denied.status_code == 403 and denied.http_version == "HTTP/2"
    assert denied.headers["x-egress-reason"] == "no allow rule matches"
    seen = world.h2.seen.requests[before:]
    assert [(r["method"], r["path"]) for r in seen] == [("GET", "/items?x=1")] * 3
    span = _spans(world, lambda s: s.attributes.get("url.full") == url, 3)[0]
    assert span.attributes["egress.tls.inspected"] is True


def test_curl_http2_and_httpx_http1(world: World) -> None:
    url = _url("h2.inspected.test", world.h2.port, "/curl")
    status, _, body, version = _curl(world, "--cacert", str(world.egress_ca), "--http2", url)
    assert (status, version) == (200, "HTTP/2"), body
    with httpx.Client(
        proxy=world.sidecar.proxy_url, verify=_trusting(world.egress_ca), timeout=10
    ) as client:
        resp = client.get(_url("api.inspected.test", world.api.port, "/v1/x"))
    assert resp.status_code == 200 and resp.http_version == "HTTP/1.1"


def test_openssl_s_client_verifies_the_leaf(world: World) -> None:
    proxy = world.sidecar.proxy_url.removeprefix("http://")
    proc = subprocess.run(
        [
            "openssl",
            "s_client",
            "-proxy",
            proxy,
            "-connect",
            f"api.inspected.test:{world.api.port}",
            "-servername",
            "api.inspected.test",
            "-CAfile",
            str(world.egress_ca),
            "-verify_return_error",
            "-ign_eof",
            "-alpn",
            "http/1.1",
        ],
        input="GET /v1/s HTTP/1.1\r\nHost: api.inspected.test\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert "Verify return code: 0 (ok)" in proc.stdout, proc.stdout + proc.stderr
    assert f"CN={EGRESS_CA_NAME}" in proc.stdout.replace(" = ", "=")
    assert "HTTP/1.1 200" in proc.stdout


# -- denied inside the TLS: 403, the upstream receives nothing ---------------------------------


@pytest.mark.parametrize(
    ("method", "path", "reason", "rule"),
    [
        ("DELETE", "/v1/charges", "no allow rule matches", None),
        ("GET", "/other", "no allow rule matches", None),
        ("GET", "/v1/admin/users", "matched deny rule", "{host: api.inspected.test"),
        ("GET", "/v1/x/../admin/users", "matched deny rule", "{host: api.inspected.test"),
    ],
)
def test_denied_method_and_path_get_403_inside_tls(
    world: World, method: str, path: str, reason: str, rule: str | None
) -> None:
    before = len(world.api.seen.requests)
    url = _url("api.inspected.test", world.api.port, path)
    status, headers, body, _ = _curl(
        world, "--cacert", str(world.egress_ca), "--path-as-is", "-X", method, url
    )
    assert status == 403, body
    assert headers["x-egress-decision"] == "deny"
    assert headers["x-egress-reason"] == reason
    assert body.startswith(f"egress-sidecar denied {method} api.inspected.test:")
    assert len(world.api.seen.requests) == before  # nothing was sent upstream
    line = world.sidecar.wait_decisions(
        lambda d: d.get("method") == method and d.get("url", "").endswith(path)
    )[-1]
    assert line["decision"] == "deny" and line["inspected"] is True
    if rule is not None:
        assert line["rule"].startswith(rule)
    span = _spans(world, lambda s: s.attributes.get("url.full") == url)[0]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "egress_denied"
    assert span.attributes["http.response.status_code"] == 403


# -- failure modes -----------------------------------------------------------------------------


def test_invalid_upstream_certificate_is_a_502(world: World) -> None:
    url = _url("bad.inspected.test", world.bad.port, "/anything")
    status, headers, body, _ = _curl(world, "--cacert", str(world.egress_ca), url)
    assert status == 502, body
    assert headers["x-egress-reason"] == "upstream certificate invalid"
    assert headers["x-egress-decision"] == "allow"
    assert headers["x-egress-error"] == "upstream_certificate_invalid"
    assert world.bad.seen.requests == []  # the handshake failed: no request was sent
    span = _spans(world, lambda s: s.attributes.get("url.full") == url)[0]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "upstream_certificate_invalid"
    assert "certificate verify failed" in span.attributes["egress.upstream.error"].lower()
    channel = _spans(
        world,
        lambda s: (
            s.name == "CONNECT" and s.attributes.get("server.address") == "bad.inspected.test"
        ),
    )[0]
    assert channel.attributes["error.type"] == "upstream_certificate_invalid"


def test_client_that_does_not_trust_the_ca_is_reported(world: World) -> None:
    port = world.api.port
    with pytest.raises(ssl.SSLCertVerificationError):
        _peer_cert(world, "api.inspected.test", port, world.upstream_ca)
    span = _spans(
        world,
        lambda s: (
            s.name == "CONNECT"
            and s.attributes.get("server.address") == "api.inspected.test"
            and s.attributes.get("error.type") == "tls_client_rejected"
        ),
    )[0]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["egress.tls.inspected"] is True
    assert "refused the inspection certificate" in span.attributes["egress.upstream.error"]


def test_a_host_not_inspected_shows_the_upstreams_own_certificate(world: World) -> None:
    cert = _peer_cert(world, "plain.test", world.plain.port, world.upstream_ca)
    der = cert.public_bytes(Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == world.plain_fingerprint
    span = _spans(
        world,
        lambda s: s.name == "CONNECT" and s.attributes.get("server.address") == "plain.test",
    )[0]
    assert span.attributes["egress.tls.passthrough"] is True
    assert span.attributes["egress.tls.inspected"] is False


def test_sni_naming_another_host_is_refused_before_any_leaf(world: World) -> None:
    sock, head = world.sidecar.connect_tunnel(f"api.inspected.test:{world.api.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(world.egress_ca))
    with (
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        context.wrap_socket(sock, server_hostname="plain.test"),
    ):
        pass
    line = world.sidecar.wait_decisions(lambda d: d.get("reason") == "sni mismatch")[-1]
    assert line["host"] == "api.inspected.test"


def test_start_line_says_inspection_is_available(world: World) -> None:
    lines = [json.loads(x) for x in world.sidecar.stderr if x.startswith("{")]
    found = [x for x in lines if x.get("msg") == "HTTPS inspection available"]
    assert found and found[0]["inspection_ca"] == f"CN={EGRESS_CA_NAME}"
    assert str(world.upstream_ca) in found[0]["inspection_upstream_trust"]


# -- the CA not available: inspected hosts denied (fail closed), the others unaffected ---------


@pytest.mark.parametrize("engine", ["fast", "mitmproxy"])
def test_ca_missing_denies_inspected_hosts_only(tmp_path: Path, world: World, engine: str) -> None:
    allowlist = f"""
allow:
  - {{host: api.inspected.test, ports: [{world.api.port}], inspect: true, methods: [GET]}}
  - {{host: plain.test, ports: [{world.plain.port}]}}
"""
    sidecar = start_sidecar(
        tmp_path,
        allowlist=allowlist,
        hosts={"api.inspected.test": API, "plain.test": PLAIN},
        args=[
            "--allow-private-range",
            "127.0.0.0/8",
            "--inspect-ca-dir",
            str(tmp_path / "no-such-dir"),
            "--engine",
            engine,
        ],
    )
    try:
        before = world.api.seen.connections
        sock, head = sidecar.connect_tunnel(f"api.inspected.test:{world.api.port}")
        sock.close()
        assert head.startswith(b"HTTP/1.1 403"), head
        assert b"x-egress-reason: inspection CA not available" in head
        assert world.api.seen.connections == before  # not even connected
        line = sidecar.wait_decisions(lambda d: d.get("host") == "api.inspected.test")[-1]
        assert line["reason"] == "inspection CA not available"
        assert "no-such-dir does not exist" in line["detail"]
        # A host that is not inspected passes through as ever.
        sock, head = sidecar.connect_tunnel(f"plain.test:{world.plain.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        with _trusting(world.upstream_ca).wrap_socket(sock, server_hostname="plain.test") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None and hashlib.sha256(der).hexdigest() == world.plain_fingerprint
        logs = [json.loads(x) for x in sidecar.stderr if x.startswith("{")]
        start = [x for x in logs if x.get("msg", "").startswith("HTTPS inspection not available")]
        assert start and start[0]["level"] == "info"  # no CA directory: not configured
        assert start[0]["inspection_problem"].endswith("no-such-dir does not exist")
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]


def test_an_unusable_ca_is_a_warning_at_start(tmp_path: Path, world: World) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "tls.crt").write_bytes(world.upstream_ca.read_bytes())  # a key is missing
    sidecar = start_sidecar(
        tmp_path, allowlist="allow:\n  - a.test\n", args=["--inspect-ca-dir", str(ca_dir)]
    )
    try:
        logs = [json.loads(x) for x in sidecar.stderr if x.startswith("{")]
        start = [x for x in logs if x.get("msg", "").startswith("HTTPS inspection not available")]
        assert start and start[0]["level"] == "warning"
        assert "cannot read the CA" in start[0]["inspection_problem"]
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]


def test_reference_engine_inspects_too(tmp_path: Path, world: World, ca_file: Path) -> None:
    allowlist = f"""
allow:
  - {{host: api.inspected.test, ports: [{world.api.port}], inspect: true, methods: [GET]}}
"""
    sidecar = start_sidecar(
        tmp_path,
        allowlist=allowlist,
        hosts={"api.inspected.test": API},
        args=[
            "--allow-private-range",
            "127.0.0.0/8",
            "--inspect-ca-dir",
            str(world.ca_dir),
            "--inspect-upstream-ca-file",
            str(ca_file),
            "--engine",
            "mitmproxy",
        ],
    )
    try:
        proxies = {"https": sidecar.proxy_url}
        url = _url("api.inspected.test", world.api.port, "/v1/ref")
        ok = requests.get(url, proxies=proxies, verify=str(world.egress_ca), timeout=10)
        assert ok.status_code == 200 and ok.json()["path"] == "/v1/ref"
        denied = requests.post(url, proxies=proxies, verify=str(world.egress_ca), timeout=10)
        assert denied.status_code == 403
        # `ok` keeps its keep-alive connection open: idle between requests, the drain closes it
        # at once (a tunnel would be waited for).
        started = time.monotonic()
        assert sidecar.stop() == 0, sidecar.stderr[-20:]
        assert time.monotonic() - started < 5
        assert ok.ok
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]


def test_ca_missing_in_audit_mode_passes_through_uninspected(tmp_path: Path, world: World) -> None:
    allowlist = f"""
mode: audit
allow:
  - {{host: api.inspected.test, ports: [{world.api.port}], inspect: true, methods: [GET]}}
"""
    sidecar = start_sidecar(
        tmp_path,
        allowlist=allowlist,
        hosts={"api.inspected.test": API},
        args=["--allow-private-range", "127.0.0.0/8", "--inspect-ca-dir", str(tmp_path / "no")],
    )
    try:
        # The upstream's own certificate: nothing was decrypted.
        cert = _peer_cert_via(sidecar, "api.inspected.test", world.api.port, world.upstream_ca)
        assert cert.issuer != x509.Name.from_rfc4514_string(f"CN={EGRESS_CA_NAME}")
        line = sidecar.wait_decisions(lambda d: d.get("host") == "api.inspected.test")[-1]
        assert (line["decision"], line["reason"]) == ("audit", "inspection CA not available")
        assert "inspected" not in line
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]


def _peer_cert_via(sidecar: Sidecar, host: str, port: int, cafile: Path) -> x509.Certificate:
    sock, head = sidecar.connect_tunnel(f"{host}:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    with _trusting(cafile).wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
