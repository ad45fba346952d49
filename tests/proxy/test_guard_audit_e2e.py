"""The private-address guard, audit mode, gRPC export and the trace file, through real sidecars."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.otlp import STATUS_ERROR, OtlpGrpcReceiver
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer

INTERNAL, CIDR_OK, RANGE_OK = "127.0.0.9", "127.0.0.10", "127.0.0.11"
# multi.test resolves to both; only the second is in privateRanges.
MULTI_PRIVATE, MULTI_VETTED = "127.0.0.20", "127.0.0.21"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, UpstreamServer]]:
    servers = {
        "internal": UpstreamServer(INTERNAL, label="internal").start(),
        "cidr": UpstreamServer(CIDR_OK, label="cidr").start(),
        "range": UpstreamServer(RANGE_OK, label="range").start(),
    }
    port = servers["range"].port
    servers["multi-private"] = UpstreamServer(MULTI_PRIVATE, port, label="multi-private").start()
    servers["multi-vetted"] = UpstreamServer(MULTI_VETTED, port, label="multi-vetted").start()
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, upstreams: dict[str, UpstreamServer]
) -> Iterator[tuple[Sidecar, Path]]:
    """No --allow-private-range: loopback is private, only cidr rules and privateRanges open it."""
    tmp = tmp_path_factory.mktemp("guard")
    i, c, r = (upstreams[k].port for k in ("internal", "cidr", "range"))
    allowlist = f"""
allow:
  - host: internal.test
    ports: [{i}]
  - host: cidr.test
    ports: [{c}]
  - cidr: {CIDR_OK}/32
    ports: [{c}]
  - host: range.test
    ports: [{r}]
  - host: multi.test
    ports: [{r}]
privateRanges:
  - {RANGE_OK}/32
  - {MULTI_VETTED}/32
"""
    trace_file = tmp / "spans.jsonl"
    sidecar = start_sidecar(
        tmp,
        allowlist=allowlist,
        hosts={"internal.test": INTERNAL, "cidr.test": CIDR_OK, "range.test": RANGE_OK},
        extra_hosts=[f"{MULTI_PRIVATE} multi.test", f"{MULTI_VETTED} multi.test"],
        args=["--trace-file", str(trace_file)],
    )
    yield sidecar, trace_file
    assert sidecar.stop() == 0


def _get(sidecar: Sidecar, url: str) -> requests.Response:
    return requests.get(url, proxies={"http": sidecar.proxy_url}, timeout=10)


def test_an_allowed_name_resolving_to_a_private_address_is_denied(
    guarded: tuple[Sidecar, Path], upstreams: dict[str, UpstreamServer]
) -> None:
    sidecar, _ = guarded
    before = upstreams["internal"].seen.connections
    r = _get(sidecar, f"http://internal.test:{upstreams['internal'].port}/")
    assert r.status_code == 403
    assert r.headers["x-egress-reason"] == "private address"
    assert INTERNAL in r.text
    assert upstreams["internal"].seen.connections == before


def test_a_cidr_rule_naming_the_private_address_decides(
    guarded: tuple[Sidecar, Path], upstreams: dict[str, UpstreamServer]
) -> None:
    sidecar, _ = guarded
    r = _get(sidecar, f"http://cidr.test:{upstreams['cidr'].port}/")
    assert r.status_code == 200 and r.json()["upstream"] == "cidr"
    d = sidecar.wait_decisions(lambda d: d.get("host") == "cidr.test")[-1]
    assert d["rule"] == f"{{cidr: {CIDR_OK}/32, ports: [{upstreams['cidr'].port}]}}"
    ip_literal = _get(sidecar, f"http://{CIDR_OK}:{upstreams['cidr'].port}/literal")
    assert ip_literal.status_code == 200


def test_private_ranges_let_host_rules_decide(
    guarded: tuple[Sidecar, Path], upstreams: dict[str, UpstreamServer]
) -> None:
    sidecar, _ = guarded
    r = _get(sidecar, f"http://range.test:{upstreams['range'].port}/")
    assert r.status_code == 200
    d = sidecar.wait_decisions(lambda d: d.get("host") == "range.test")[-1]
    assert d["rule"] == f"{{host: range.test, ports: [{upstreams['range'].port}]}}"


def test_the_proxy_connects_to_the_address_it_vetted(
    guarded: tuple[Sidecar, Path], upstreams: dict[str, UpstreamServer]
) -> None:
    sidecar, _ = guarded
    private, vetted = upstreams["multi-private"], upstreams["multi-vetted"]
    before = private.seen.connections
    for _ in range(3):
        r = _get(sidecar, f"http://multi.test:{vetted.port}/")
        assert r.status_code == 200 and r.json()["upstream"] == "multi-vetted"
    assert private.seen.connections == before
    d = sidecar.wait_decisions(lambda d: d.get("host") == "multi.test")[-1]
    assert d["address"] == MULTI_VETTED


def test_cloud_metadata_is_denied_without_any_connection_attempt(
    guarded: tuple[Sidecar, Path],
) -> None:
    sidecar, _ = guarded
    # 169.254.169.254 is link-local: denied by the guard before any connect (no route needed).
    r = _get(sidecar, "http://169.254.169.254/latest/meta-data/")
    assert r.status_code == 403
    assert r.headers["x-egress-reason"] == "private address"
    assert "169.254.169.254 is cloud metadata" in r.text


def test_trace_file_holds_otlp_json_lines_with_hex_ids(
    guarded: tuple[Sidecar, Path], upstreams: dict[str, UpstreamServer]
) -> None:
    sidecar, trace_file = guarded
    _get(sidecar, f"http://internal.test:{upstreams['internal'].port}/file")
    sidecar.stop()  # flushes the batch processor
    lines = trace_file.read_text().splitlines()
    assert lines
    spans = [
        span
        for line in lines
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]
    denied = [
        s
        for s in spans
        if any(
            a["key"] == "egress.decision" and a["value"]["stringValue"] == "deny"
            for a in s["attributes"]
        )
    ]
    assert denied
    assert all(len(s["traceId"]) == 32 and len(s["spanId"]) == 16 for s in spans)
    assert denied[0]["kind"] == 3 and denied[0]["status"]["code"] == 2


# -- audit mode, exported over gRPC ---------------------------------------------------------


@pytest.fixture(scope="module")
def audit(
    tmp_path_factory: pytest.TempPathFactory,
    upstreams: dict[str, UpstreamServer],
    otlp_grpc: OtlpGrpcReceiver,
) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("audit")
    sidecar = start_sidecar(
        tmp,
        allowlist=f"allow:\n  - host: cidr.test\n    ports: [{upstreams['cidr'].port}]\n",
        hosts={"internal.test": INTERNAL, "cidr.test": CIDR_OK},
        args=["--mode", "audit", "--allow-private-range", "127.0.0.0/8"],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_grpc.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            # Allowed calls are sampled out; audited (would-be denied) ones must still arrive.
            "OTEL_TRACES_SAMPLER": "always_off",
        },
    )
    yield sidecar
    assert sidecar.stop() == 0


def test_audit_lets_a_would_be_denial_through_and_records_it(
    audit: Sidecar, upstreams: dict[str, UpstreamServer], otlp_grpc: OtlpGrpcReceiver
) -> None:
    r = _get(audit, f"http://internal.test:{upstreams['internal'].port}/audited")
    assert r.status_code == 200 and r.json()["upstream"] == "internal"
    d = audit.wait_decisions(lambda d: d.get("host") == "internal.test")[-1]
    assert d["decision"] == "audit" and d["reason"] == "no allow rule matches"
    span = otlp_grpc.sink.wait_for(lambda s: s.attributes.get("server.address") == "internal.test")
    a = span[-1].attributes
    assert a["egress.decision"] == "audit"
    assert a["egress.reason"] == "no allow rule matches"
    assert "error.type" not in a
    assert span[-1].status_code != STATUS_ERROR


def test_allowed_calls_follow_the_configured_sampler(
    audit: Sidecar, upstreams: dict[str, UpstreamServer], otlp_grpc: OtlpGrpcReceiver
) -> None:
    r = _get(audit, f"http://cidr.test:{upstreams['cidr'].port}/sampled-out")
    assert r.status_code == 200
    audit.wait_decisions(lambda d: d.get("url", "").endswith("/sampled-out"))
    # a later audited call arrives; the allowed one (always_off) never does
    _get(audit, f"http://internal.test:{upstreams['internal'].port}/marker")
    otlp_grpc.sink.wait_for(lambda s: str(s.attributes.get("url.full", "")).endswith("/marker"))
    assert not [
        s
        for s in otlp_grpc.sink.spans
        if str(s.attributes.get("url.full", "")).endswith("/sampled-out")
    ]


def test_check_command_prints_decision_reason_rule_and_exit_code(tmp_path: Path) -> None:
    allowlist = tmp_path / "a.yaml"
    allowlist.write_text(
        "allow:\n  - api.stripe.com\n  - '*.googleapis.com'\ndeny:\n  - upload.googleapis.com\n"
    )
    bin_ = Path(__import__("sys").executable).parent / "egress-sidecar"

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_), "check", "--allowlist-file", str(allowlist), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = check("https://api.stripe.com/v1/charges")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("allow api.stripe.com:443")
    assert "rule:   api.stripe.com" in ok.stdout
    denied = check("upload.googleapis.com")
    assert denied.returncode == 1
    assert "matched deny rule" in denied.stdout
    apex = check("googleapis.com:443")
    assert apex.returncode == 1 and "no allow rule matches" in apex.stdout
    port = check("api.stripe.com:8443")
    assert port.returncode == 1
    bad = check("http://[::1")
    assert bad.returncode == 2
