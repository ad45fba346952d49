"""Transparent capture end to end: iptables rules from `egress-sidecar iptables apply`, the real
sidecar as UID 1337 in the pod namespace, real clients as the app's UID with no proxy variables.

Outside: HTTP (80), HTTPS with its own certificate (443), raw TCP echo and a server-speaks-first
banner, on three addresses per family: [0] the allowed web host, [1] an address the allowlist
does not name, [2] the database host named by ``cidr`` rules. The outside servers log every
accepted connection before reading a byte, so "never reached the upstream" is checked directly.

Name resolution without touching the machine's /etc/hosts: the app sends Host/SNI itself
(curl --resolve, openssl -servername); the sidecar runs in a private mount namespace with a
hosts file bind-mounted over /etc/hosts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes

from tests.netns.conftest import APP_UID, iptables
from tests.support import netns as h
from tests.support.netns import OUT4, OUT6, PROXY_UID

WEB4, OTHER4, DB4 = OUT4
WEB6, OTHER6, DB6 = OUT6

ALLOWLIST = f"""\
allow:
  - web.test
  - web6.test
  - cidr: {DB4}/32
    ports: [5432, 3306, 8443]
  - cidr: {DB6}/128
    ports: [5432]
"""

HOSTS = {"web.test": WEB4, "web6.test": WEB6, "denied.test": OTHER4, "denied6.test": OTHER6}


def b(addr: str) -> str:
    """Address as it appears in host:port text (IPv6 bracketed)."""
    return f"[{addr}]" if ":" in addr else addr


@dataclass
class Pod:
    world: h.World
    certs: h.Certs
    upstream: h.Upstream
    sidecar_out: Path
    trace_file: Path
    binds: dict[str, Path]

    def curl(self, *args: str, uid: int = APP_UID) -> tuple[int, str, str]:
        return h.pod_curl(self.world, args, uid=uid)

    def s_client(self, addr: str, port: int, sni: str | None, uid: int = APP_UID) -> str:
        argv = ["openssl", "s_client", "-connect", f"{b(addr)}:{port}", "-showcerts"]
        argv += ["-servername", sni] if sni else ["-noservername"]
        argv += ["-CAfile", str(self.certs.ca_pem), "-verify_return_error"]
        proc = self.world.pod.run(argv, uid=uid, timeout=15, input="")
        return proc.stdout + proc.stderr

    def accepted(self, mark: int, addr: str, port: int) -> list[dict[str, Any]]:
        """Connections the outside accepted on addr:port since mark."""
        local = f"{b(addr)}:{port}"
        return [
            r for r in self.upstream.since(mark) if r["event"] == "accept" and r["local"] == local
        ]

    def nothing_reached(self, mark: int, addr: str, port: int) -> bool:
        time.sleep(0.3)  # a late (wrong) upstream connection would show up by now
        return not self.accepted(mark, addr, port)

    def requests(self, mark: int) -> list[dict[str, Any]]:
        return [r for r in self.upstream.since(mark) if r["event"] == "request"]

    def decisions(self) -> list[dict[str, Any]]:
        return h.decisions(self.sidecar_out)

    def spans(self, predicate: Any, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = [s for s in _read_spans(self.trace_file) if predicate(s)]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return found


def _attr_value(v: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    return v


def _read_spans(path: Path) -> list[dict[str, Any]]:
    spans = []
    for line in h.iter_lines(path):
        if not line.strip():
            continue
        for rs in json.loads(line).get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    attrs = {a["key"]: _attr_value(a["value"]) for a in span.get("attributes", [])}
                    spans.append({"name": span["name"], **attrs})
    return spans


@pytest.fixture(scope="module")
def pod(world: h.World) -> Iterator[Pod]:
    w = world
    certs = h.make_certs(w.workdir, list(HOSTS), [*OUT4, *OUT6])
    every = [*OUT4, *OUT6]
    upstream = w.start_servers(
        w.outside,
        "outside",
        certs,
        http=[f"{b(a)}:80" for a in every],
        https=[f"{b(a)}:443" for a in every] + [f"{DB4}:8443"],
        echo=[f"{b(a)}:{p}" for a in (OTHER4, DB4, OTHER6, DB6) for p in (5432, 5433)],
        banner=[f"{DB4}:3306"],
        udp=[f"{WEB4}:443", f"[{WEB6}]:443"],
    )
    proc = iptables(w, "apply", "--ipv6", "on")
    assert proc.returncode == 0, proc.stderr

    trace_file = w.workdir / "sidecar" / "spans.jsonl"
    sidecar = h.start_pod_sidecar(
        w,
        ALLOWLIST,
        HOSTS,
        private_ranges=["198.18.0.0/15", "fd00::/8"],
        listen6="::1:15002",
        extra=["--trace-file", str(trace_file), "--first-byte-timeout", "1"],
        env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "netns-app"},
    )
    yield Pod(w, certs, upstream, sidecar.out, trace_file, sidecar.binds)


# --- plain HTTP -----------------------------------------------------------------------------


def test_allowed_http_with_curl_reaches_the_upstream_through_the_proxy(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, err = pod.curl("--resolve", f"web.test:80:{WEB4}", "http://web.test/hello")
    assert code == 0, err
    assert json.loads(body) == {
        "server": "upstream",
        "kind": "http",
        "local": f"{WEB4}:80",
        "host": "web.test",
    }
    (req,) = pod.requests(mark)
    assert req["target"] == "/hello"
    assert "traceparent" in req["headers"]  # the sidecar handled it: captured, not direct


def test_allowed_http_with_python_urllib(pod: Pod) -> None:
    result = pod.world.client("urllib", f"http://{WEB4}/py", "--host", "web.test", uid=APP_UID)
    assert result["status"] == 200, result
    assert json.loads(result["body"])["host"] == "web.test"


def test_denied_http_gets_403_and_never_reaches_the_upstream(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, err = pod.curl(
        "-i", "--resolve", f"denied.test:80:{OTHER4}", "http://denied.test/secret"
    )
    assert code == 0, err
    head = body.lower()
    assert head.startswith("http/1.1 403"), body
    assert "x-egress-decision: deny" in head
    assert pod.nothing_reached(mark, OTHER4, 80)


def test_forged_host_cannot_reach_an_unlisted_address(pod: Pod) -> None:
    """The app dials an address no rule names but claims an allowed Host: the request goes to
    where web.test resolves for the sidecar (or nowhere), never to the dialled address."""
    mark = pod.upstream.mark()
    code, body, err = pod.curl("-H", "Host: web.test", f"http://{OTHER4}/forged")
    assert code == 0, err
    assert json.loads(body)["local"] == f"{WEB4}:80"  # sent to the vetted address of web.test
    assert pod.nothing_reached(mark, OTHER4, 80)


def test_each_request_on_a_keepalive_connection_is_decided_on_its_own(pod: Pod) -> None:
    mark = pod.upstream.mark()
    result = pod.world.client("keepalive", WEB4, "80", "web.test", "denied.test", uid=APP_UID)
    assert result["statuses"] == [200, 403], result
    assert [r["headers"]["host"] for r in pod.requests(mark)] == ["web.test"]


def test_pipelined_requests_are_decided_one_by_one(pod: Pod) -> None:
    mark = pod.upstream.mark()
    both = (
        "GET /p1 HTTP/1.1\\r\\nHost: web.test\\r\\n\\r\\n"
        "GET /p2 HTTP/1.1\\r\\nHost: denied.test\\r\\nConnection: close\\r\\n\\r\\n"
    )
    result = pod.world.client("raw", WEB4, "80", both, uid=APP_UID)
    statuses = re.findall(r"HTTP/1\.1 (\d{3}) ", result["received"])
    assert statuses == ["200", "403"], result
    assert [r["target"] for r in pod.requests(mark)] == ["/p1"]


def test_an_absolute_form_target_is_decided_not_the_host_header(pod: Pod) -> None:
    """A server routes by an absolute-form request-target (RFC 9112 3.2.2), so that is what the
    sidecar decides: an allowed Host cannot carry a request for another site."""
    mark = pod.upstream.mark()
    forged = (
        "GET http://denied.test/abs HTTP/1.1\\r\\nHost: web.test\\r\\nConnection: close\\r\\n\\r\\n"
    )
    result = pod.world.client("raw", WEB4, "80", forged, uid=APP_UID)
    assert result["received"].startswith("HTTP/1.1 403"), result
    assert pod.nothing_reached(mark, WEB4, 80)
    assert pod.nothing_reached(mark, OTHER4, 80)


def test_an_allowed_absolute_form_target_gets_a_host_header_that_agrees(pod: Pod) -> None:
    mark = pod.upstream.mark()
    ask = (
        "GET http://web.test/abs-ok HTTP/1.1\\r\\n"
        "Host: denied.test\\r\\nConnection: close\\r\\n\\r\\n"
    )
    result = pod.world.client("raw", WEB4, "80", ask, uid=APP_UID)
    assert result["received"].startswith("HTTP/1.1 200"), result
    (req,) = pod.requests(mark)
    assert req["headers"]["host"] == "web.test"


def test_connect_sent_to_the_transparent_port_reaches_nothing(pod: Pod) -> None:
    mark = pod.upstream.mark()
    ask = "CONNECT web.test:443 HTTP/1.1\\r\\nHost: web.test:443\\r\\n\\r\\n"
    result = pod.world.client("raw", OTHER4, "80", ask, uid=APP_UID)
    assert result["received"] == "", result  # raw TCP to an unlisted address: closed
    time.sleep(0.3)
    assert not [r for r in pod.upstream.since(mark) if r["event"] == "accept"]
    tcp = [d for d in pod.decisions() if d["protocol"] == "TCP" and d.get("address") == OTHER4]
    assert tcp and tcp[-1]["decision"] == "deny" and tcp[-1]["port"] == 80


# --- TLS ------------------------------------------------------------------------------------


def test_allowed_https_with_curl_verifies_against_the_upstreams_own_ca(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, err = pod.curl(
        "--cacert",
        str(pod.certs.ca_pem),
        "--resolve",
        f"web.test:443:{WEB4}",
        "https://web.test/tls",
    )
    assert code == 0, err  # verification against our test CA only: no mitmproxy CA involved
    assert json.loads(body) == {
        "server": "upstream",
        "kind": "https",
        "local": f"{WEB4}:443",
        "host": "web.test",
    }
    assert len(pod.accepted(mark, WEB4, 443)) == 1


def test_openssl_sees_the_upstreams_certificate(pod: Pod) -> None:
    out = pod.s_client(WEB4, 443, "web.test")
    certs = h.pem_certificates(out)
    assert certs, out
    assert certs[0].fingerprint(hashes.SHA256()).hex() == pod.certs.leaf_der_sha256
    assert pod.certs.ca_subject_cn in certs[0].issuer.rfc4514_string()
    assert "Verify return code: 0 (ok)" in out


def test_allowed_https_with_python_urllib(pod: Pod) -> None:
    # urllib resolves the name itself (and sends it as SNI): the app gets the pod's hosts file.
    result = pod.world.client(
        "urllib", "https://web.test/py", "--cafile", str(pod.certs.ca_pem), uid=APP_UID,
        binds=pod.binds,
    )  # fmt: skip
    assert result["status"] == 200, result
    assert json.loads(result["body"])["kind"] == "https"


def test_https_to_an_ip_without_sni_is_decided_by_address(pod: Pod) -> None:
    """Python sends no SNI for an IP-literal URL: only cidr rules could allow it; none names
    WEB4, so the connection is closed and the upstream sees nothing."""
    mark = pod.upstream.mark()
    result = pod.world.client(
        "urllib", f"https://{WEB4}/py", "--cafile", str(pod.certs.ca_pem), uid=APP_UID
    )
    assert result["status"] is None and "EOF" in result["error"], result
    assert pod.nothing_reached(mark, WEB4, 443)


def test_denied_sni_is_closed_before_reaching_the_upstream(pod: Pod) -> None:
    mark = pod.upstream.mark()
    out = pod.s_client(OTHER4, 443, "denied.test")
    assert not h.pem_certificates(out), out
    assert pod.nothing_reached(mark, OTHER4, 443)
    code, _, _ = pod.curl(
        "--cacert", str(pod.certs.ca_pem), "--resolve", f"denied.test:443:{OTHER4}",
        "https://denied.test/",
    )  # fmt: skip
    assert code != 0
    assert pod.nothing_reached(mark, OTHER4, 443)


def test_forged_sni_cannot_reach_an_unlisted_address(pod: Pod) -> None:
    mark = pod.upstream.mark()
    out = pod.s_client(OTHER4, 443, "web.test")
    assert pod.nothing_reached(mark, OTHER4, 443), out
    # Connected to the vetted address of the SNI host instead of the dialled one.
    assert len(pod.accepted(mark, WEB4, 443)) == 1
    certs = h.pem_certificates(out)
    assert certs and certs[0].fingerprint(hashes.SHA256()).hex() == pod.certs.leaf_der_sha256


def test_tls_without_sni_is_decided_by_cidr_rules(pod: Pod) -> None:
    mark = pod.upstream.mark()
    allowed = pod.s_client(DB4, 8443, None)  # cidr rule names DB4:8443
    certs = h.pem_certificates(allowed)
    assert certs and certs[0].fingerprint(hashes.SHA256()).hex() == pod.certs.leaf_der_sha256
    assert len(pod.accepted(mark, DB4, 8443)) == 1
    denied = pod.s_client(OTHER4, 443, None)  # no rule names OTHER4
    assert not h.pem_certificates(denied)
    assert pod.nothing_reached(mark, OTHER4, 443)


# --- raw TCP, UDP ---------------------------------------------------------------------------


def test_raw_tcp_follows_cidr_rules(pod: Pod) -> None:
    mark = pod.upstream.mark()
    ok = pod.world.client("tcp", DB4, "5432", "--send", "SELECT 1\n", uid=APP_UID)
    assert ok["received"] == "SELECT 1\n", ok
    assert len(pod.accepted(mark, DB4, 5432)) == 1
    for addr, port in ((DB4, 5433), (OTHER4, 5432)):  # port not listed / address not listed
        denied = pod.world.client("tcp", addr, str(port), "--send", "SELECT 1\n", uid=APP_UID)
        assert denied["received"] == "", denied
        assert pod.nothing_reached(mark, addr, port)


def test_server_speaks_first_protocol_passes_when_allowed(pod: Pod) -> None:
    result = pod.world.client("tcp", DB4, "3306", uid=APP_UID)
    assert result["received"].startswith(f"220 banner from {DB4}:3306"), result


def test_a_silent_client_to_an_unlisted_address_is_closed_after_the_first_byte_timeout(
    pod: Pod,
) -> None:
    """A server-speaks-first protocol to an address no cidr rule allows: the client would wait
    for a greeting forever; after --first-byte-timeout (1 s here) it is decided as raw TCP."""
    mark = pod.upstream.mark()
    started = time.monotonic()
    result = pod.world.client("tcp", OTHER4, "5432", uid=APP_UID)  # sends nothing
    elapsed = time.monotonic() - started
    assert result["connected"] and result["received"] == "", result
    assert elapsed < 4.5, elapsed  # closed by the sidecar, not by the client's 5 s timeout
    assert pod.nothing_reached(mark, OTHER4, 5432)
    tcp = [
        d
        for d in pod.decisions()
        if d["protocol"] == "TCP" and d.get("address") == OTHER4 and d["port"] == 5432
    ]
    assert tcp and tcp[-1]["decision"] == "deny"


@pytest.mark.parametrize("addr", [WEB4, WEB6])
def test_udp_443_is_rejected_so_quic_falls_back(pod: Pod, addr: str) -> None:
    mark = pod.upstream.mark()
    result = pod.world.client("udp", addr, "443", uid=APP_UID)
    assert result["reply"] is None and result["error"] in (
        "PermissionError",
        "ConnectionRefusedError",
    ), result
    assert not [r for r in pod.upstream.since(mark) if r["event"] == "datagram"]


# --- IPv6 -----------------------------------------------------------------------------------


def test_ipv6_http_is_captured_like_ipv4(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, err = pod.curl("--resolve", f"web6.test:80:{WEB6}", "http://web6.test/v6")
    assert code == 0, err
    assert json.loads(body)["local"] == f"[{WEB6}]:80"
    (req,) = pod.requests(mark)
    assert "traceparent" in req["headers"]
    code, body, err = pod.curl(
        "-i", "--resolve", f"denied6.test:80:{OTHER6}", "http://denied6.test/"
    )
    assert body.lower().startswith("http/1.1 403"), (body, err)
    assert pod.nothing_reached(mark, OTHER6, 80)


def test_ipv6_tls_and_raw_tcp(pod: Pod) -> None:
    mark = pod.upstream.mark()
    out = pod.s_client(WEB6, 443, "web6.test")
    certs = h.pem_certificates(out)
    assert certs and certs[0].fingerprint(hashes.SHA256()).hex() == pod.certs.leaf_der_sha256
    assert not h.pem_certificates(pod.s_client(OTHER6, 443, "denied6.test"))
    assert pod.nothing_reached(mark, OTHER6, 443)
    ok = pod.world.client("tcp", DB6, "5432", "--send", "v6\n", uid=APP_UID)
    assert ok["received"] == "v6\n", ok
    denied = pod.world.client("tcp", OTHER6, "5432", "--send", "v6\n", uid=APP_UID)
    assert denied["received"] == ""
    assert pod.nothing_reached(mark, OTHER6, 5432)


# --- who is captured ------------------------------------------------------------------------


def test_the_sidecars_own_traffic_is_not_looped(pod: Pod) -> None:
    """UID 1337 goes straight out: a destination the policy denies is reached directly."""
    mark = pod.upstream.mark()
    code, body, err = pod.curl(
        "--resolve", f"denied.test:80:{OTHER4}", "http://denied.test/direct", uid=PROXY_UID
    )
    assert code == 0, err
    assert json.loads(body)["local"] == f"{OTHER4}:80"
    (req,) = pod.requests(mark)
    assert "traceparent" not in req["headers"]  # not through the proxy


def test_an_app_running_as_root_is_captured_too(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, _ = pod.curl(
        "-i", "--resolve", f"denied.test:80:{OTHER4}", "http://denied.test/", uid=0
    )
    assert body.lower().startswith("http/1.1 403"), body
    assert pod.nothing_reached(mark, OTHER4, 80)
    code, body, err = pod.curl("--resolve", f"web.test:80:{WEB4}", "http://web.test/root", uid=0)
    assert code == 0, err
    (req,) = pod.requests(mark)
    assert "traceparent" in req["headers"]


# --- what the sidecar reports ---------------------------------------------------------------


def test_transparent_decisions_are_traced(pod: Pod) -> None:
    pod.curl("--resolve", f"web.test:80:{WEB4}", "http://web.test/span")
    pod.s_client(OTHER4, 443, "denied.test")
    pod.world.client("tcp", DB4, "5432", "--send", "x\n", uid=APP_UID)

    def http_allow(s: dict[str, Any]) -> bool:
        return str(s.get("url.full", "")).endswith("/span")

    def tls_deny(s: dict[str, Any]) -> bool:
        return s["name"] == "TLS" and s.get("server.address") == "denied.test"

    def tcp_allow(s: dict[str, Any]) -> bool:
        return (
            s["name"] == "TCP"
            and s.get("network.peer.address") == DB4
            and s.get("server.port") == 5432
        )

    (span,) = pod.spans(http_allow)[-1:]
    assert span["egress.capture"] == "transparent" and span["egress.decision"] == "allow"
    assert span["server.address"] == "web.test"
    (span,) = pod.spans(tls_deny)[-1:]
    assert span["egress.decision"] == "deny" and span["egress.capture"] == "transparent"
    assert span["egress.reason"] and span["error.type"] == "egress_denied"
    (span,) = pod.spans(tcp_allow)[-1:]
    assert span["egress.decision"] == "allow" and span["egress.capture"] == "transparent"
    assert "server.address" not in span or span["server.address"] == DB4

    lines = [d for d in pod.decisions() if d["capture"] == "transparent"]
    assert {d["decision"] for d in lines} == {"allow", "deny"}
