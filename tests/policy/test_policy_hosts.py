"""Host normalization, host:port splitting and IP literal parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy import hosts
from sidecar.policy.errors import InvalidHost, PolicyError, clip
from sidecar.policy.hosts import normalize_host, normalize_host_once, parse_ip, split_host_port
from sidecar.policy.model import IPAddress
from sidecar.policy.parse import load_allowlist


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("api.stripe.com", "api.stripe.com"),
        ("  API.Stripe.COM  ", "api.stripe.com"),
        ("api.stripe.com.", "api.stripe.com"),  # one trailing dot dropped
        ("localhost", "localhost"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        (
            "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
            "example.com",
        ),  # fullwidth letters fold (UTS #46)
        ("bücher。example", "xn--bcher-kva.example"),  # ideographic full stop is a dot
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4.", "1.2.3.4"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2001:DB8:0:0::1]", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        # What resolvers read as IPv4 comes back as that address.
        ("127.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("010.0.0.1", "8.0.0.1"),
        ("0xA9FEA9FE", "169.254.169.254"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 61] * 4), ".".join(["a" * 61] * 4)),  # 247 characters
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty host"),
        ("   ", "empty host"),
        (".", "empty host"),
        ("example.com..", "empty label"),
        (".example.com", "empty label"),
        ("a..b", "empty label"),
        ("a" * 64 + ".com", "longer than 63"),
        (".".join(["a" * 63] * 4), "longer than 253"),
        ("exa mple.com", "character ' ' is not allowed"),
        ("exa$mple.com", "character '$' is not allowed"),
        ("*.example.com", "character '*' is not allowed"),
        ("example.com:443", "cannot contain ':'"),
        ("[1.2.3.4]", "brackets must enclose an IPv6 address"),
        ("[::1", "brackets must enclose an IPv6 address"),
        ("[example.com]", "brackets must enclose an IPv6 address"),
        ("1.2.3.4.5", "ends in a number but is not an IPv4 address"),
        ("256.1.1.1", "ends in a number but is not an IPv4 address"),
        ("example.123", "ends in a number but is not an IPv4 address"),
        ("\u0301a.com", "not a valid IDN label"),
        ("a\u200db.com", "not a valid IDN label"),
        ("⒈.com", "not a valid international name"),
    ],
)
def test_normalize_host_rejects(raw: str, reason: str) -> None:
    with pytest.raises(InvalidHost) as caught:
        normalize_host(raw)
    assert reason in str(caught.value)
    # names the host at fault, cut to 80 characters with its length after
    assert repr(clip(raw)) in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PolicyError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("example.com:443", ("example.com", 443)),
        ("  example.com:8080 ", ("example.com", 8080)),
        ("*.example.com:443", ("*.example.com", 443)),
        ("1.2.3.4:5432", ("1.2.3.4", 5432)),
        ("[::1]:443", ("::1", 443)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),  # a bare IPv6 literal has no port
        ("2001:db8::1", ("2001:db8::1", None)),
        ("example.com:65535", ("example.com", 65535)),
        ("example.com:1", ("example.com", 1)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("example.com:", "port '' is not a number"),
        ("example.com:0", "port 0 is out of range"),
        ("example.com:65536", "port 65536 is out of range"),
        ("example.com:http", "port 'http' is not a number"),
        ("example.com:-1", "port '-1' is not a number"),
        ("example.com:+80", "port '+80' is not a number"),
        ("example.com:123456", "is not a number from 1 to 65535"),
        ("[::1]443", "unexpected '443' after ']'"),
        ("[::1:443", "without a closing ']'"),
        ("[]:443", "empty host"),
    ],
)
def test_split_host_port_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidHost) as caught:
        split_host_port(text)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", ipaddress.IPv4Address("1.2.3.4")),
        (" 10.0.0.1 ", ipaddress.IPv4Address("10.0.0.1")),
        ("::1", ipaddress.IPv6Address("::1")),
        ("[::1]", ipaddress.IPv6Address("::1")),
        ("example.com", None),
        ("[1.2.3.4]", None),
        ("127.1", None),  # not a literal: normalize_host turns it into one
        ("", None),
        ("[]", None),
        ("fe80::1%a b", None),
    ],
)
def test_parse_ip(text: str, expected: object) -> None:
    assert parse_ip(text) == expected


LABEL = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?", fullmatch=True)
HOST_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.text(max_size=12), min_size=1, max_size=5).map(".".join),
    st.lists(LABEL, min_size=1, max_size=5).map(".".join),
    st.ip_addresses().map(str),
)


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(HOST_TEXT)
def test_normalize_host_is_idempotent_or_rejects(raw: str) -> None:
    try:
        once = normalize_host(raw)
    except InvalidHost:
        return
    assert normalize_host(once) == once
    assert once == once.strip().lower()
    assert once.isascii()


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(st.ip_addresses())
def test_ip_literals_come_back_compressed(address: IPAddress) -> None:
    assert normalize_host(address.exploded) == address.compressed
    if address.version == 6:
        assert normalize_host(f"[{address.exploded}]") == address.compressed


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(st.text(max_size=30), st.integers(min_value=-5, max_value=70000))
def test_split_host_port_never_raises_anything_else(host: str, port: int) -> None:
    try:
        host_out, port_out = split_host_port(f"{host}:{port}")
    except InvalidHost:
        return
    assert port_out is None or 1 <= port_out <= 65535
    assert host_out == host_out.strip()


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(HOST_TEXT)
def test_normalize_host_once_agrees_with_normalize_host(raw: str) -> None:
    try:
        expected: str | type[InvalidHost] = normalize_host(raw)
    except InvalidHost:
        expected = InvalidHost
    try:
        got: str | type[InvalidHost] = normalize_host_once(raw)
    except InvalidHost:
        got = InvalidHost
    assert got == expected


def test_parsing_an_allowlist_leaves_the_runtime_host_cache_alone() -> None:
    # The cache is for the hosts calls name; an allowlist's rules would evict them, and their
    # kept keys would pin the freed YAML node tree in memory.
    normalize_host("api.example.com")
    before = hosts._normalize_cached.cache_info().currsize
    rules = "".join(f"  - host: svc-{i}.rules.example.com\n" for i in range(50))
    policy = load_allowlist(f"mode: enforce\nallow:\n{rules}", source="test")
    assert policy.policy.rule_count == 50
    assert hosts._normalize_cached.cache_info().currsize == before
    assert normalize_host("api.example.com") == "api.example.com"
    assert hosts._normalize_cached.cache_info().currsize == before
