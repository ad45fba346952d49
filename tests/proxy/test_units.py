"""Small pure pieces of the proxy adapter: URL redaction, listen specs, protocol sniffing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.fastpath.config import ListenClashError, ListenSpec, check_distinct
from sidecar.policy.model import Decision, Reason, Verdict
from sidecar.proxy.denial import denial_body
from sidecar.proxy.hostnames import address_of, redact_url
from sidecar.record import Capture, DecisionRecord
from sidecar.wire.first_flight import http_prefix


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://a.test/x?y=1", "http://a.test/x?y=1"),
        ("http://u:p@a.test:8080/x", "http://REDACTED:REDACTED@a.test:8080/x"),
        ("http://a.test/x?sig=abc&y=1", "http://a.test/x?sig=REDACTED&y=1"),
        (
            "http://a.test/x?X-Amz-Signature=s&AWSAccessKeyId=k",
            "http://a.test/x?X-Amz-Signature=REDACTED&AWSAccessKeyId=REDACTED",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@given(st.text())
def test_redact_url_never_raises_and_never_leaks_a_password(text: str) -> None:
    out = redact_url(f"http://user:hunter2secret@h.test/{text}")
    assert "hunter2secret" not in out


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:15001", "127.0.0.1", 15001),
        ("::1:15002", "::1", 15002),
        ("[::]:15021", "::", 15021),
        ("0.0.0.0:1", "0.0.0.0", 1),
    ],
)
def test_listen_spec_parse(text: str, host: str, port: int) -> None:
    assert ListenSpec.parse(text) == ListenSpec(host, port)


@pytest.mark.parametrize("text", ["15001", "host:", ":80", "h:0", "h:65536", "h:x"])
def test_listen_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        ListenSpec.parse(text)


@pytest.mark.parametrize(
    ("one", "two", "overlap"),
    [
        ("127.0.0.1:15001", "127.0.0.1:15001", True),
        ("127.0.0.1:15001", "127.0.0.1:15006", False),
        ("127.0.0.1:15001", "127.0.0.2:15001", False),
        ("0.0.0.0:15021", "127.0.0.1:15021", True),
        ("127.0.0.1:15021", "0.0.0.0:15021", True),
        ("::1:15001", "::1:15001", True),
        ("[::]:15001", "::1:15001", True),
        ("::1:15001", "127.0.0.1:15001", False),  # two families
        ("[::]:15001", "0.0.0.0:15001", False),  # the sidecar's IPv6 sockets are v6-only
        ("0.0.0.0:15001", "0.0.0.0:15002", False),
    ],
)
def test_listen_spec_overlaps(one: str, two: str, overlap: bool) -> None:
    a, b = ListenSpec.parse(one), ListenSpec.parse(two)
    assert a.overlaps(b) is overlap and b.overlaps(a) is overlap


def test_check_distinct_names_both_flags() -> None:
    named = [
        ("--explicit-listen", ListenSpec.parse("127.0.0.1:15001")),
        ("--transparent-listen", ListenSpec.parse("127.0.0.1:15006")),
        ("--health-listen", ListenSpec.parse("0.0.0.0:15006")),
    ]
    with pytest.raises(ListenClashError) as caught:
        check_distinct(named)
    assert str(caught.value).startswith(
        "--transparent-listen 127.0.0.1:15006 and --health-listen 0.0.0.0:15006 are the same"
    )
    check_distinct(named[:2])  # distinct: no error


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"POST", None),
        (b"G", None),
        (b"\x16\x03\x01", False),
        (b"SSH-2.0-OpenSSH", False),
        (b"PRI * HTTP/2.0", False),
        (b"OPTIONS * HTTP/1.1", True),
        (b"CONNECT a:443 HTTP/1.1", False),
    ],
)
def test_http_sniffing(data: bytes, expected: bool | None) -> None:
    assert http_prefix(data) is expected


def test_address_of() -> None:
    assert str(address_of("[::1]")) == "::1"
    assert str(address_of("fe80::1%eth0")) == "fe80::1"
    assert address_of("api.test") is None


def test_denial_body_is_one_line_naming_host_port_reason_policy() -> None:
    rec = DecisionRecord(
        decision=Decision(Verdict.DENY, Reason.NO_MATCH, detail="no allow rule names x.test"),
        capture=Capture.EXPLICIT,
        protocol="CONNECT",
        host="x.test",
        port=443,
        policy_source="configmap:shop/egress-allowlist",
        policy_version="4711",
        mode="enforce",
    )
    body = denial_body(rec)
    assert body.endswith("\n") and body.count("\n") == 1
    for part in ("x.test:443", "no allow rule matches", "configmap:shop/egress-allowlist", "4711"):
        assert part in body


@pytest.mark.parametrize(
    ("host", "port", "default", "expected"),
    [
        ("api.test", 443, None, "api.test:443"),
        ("api.test", 80, 80, "api.test"),
        ("::1", 8080, 80, "[::1]:8080"),
        ("::1", 80, 80, "[::1]"),
    ],
)
def test_format_hostport(host: str, port: int, default: int | None, expected: str) -> None:
    from sidecar.proxy.hostnames import format_hostport

    assert format_hostport(host, port, default) == expected
