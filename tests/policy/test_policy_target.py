"""sidecar.policy.target: the one reading of authorities and request-targets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.net.http.url import parse_authority as mitmproxy_parse_authority

from sidecar.policy.target import (
    Authority,
    InvalidTarget,
    Target,
    parse_authority,
    parse_request_target,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.test", Authority("a.test", None)),
        ("A.Test.:8080", Authority("A.Test.", 8080)),
        ("[::1]", Authority("::1", None)),
        ("[2001:db8::1]:443", Authority("2001:db8::1", 443)),
        ("127.0.0.1:00080", Authority("127.0.0.1", 80)),
        ("_dmarc.a.test", Authority("_dmarc.a.test", None)),
        ("bücher.test", Authority("bücher.test", None)),
    ],
)
def test_authorities_accepted(text: str, expected: Authority) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no host"),
        (":80", "no host"),
        ("user@a.test", "userinfo (user@host) is not accepted"),
        ("evil.test\\@a.test", "a backslash is not accepted"),
        ("a.test?x", "'?' is not accepted"),
        ("a.test#x", "'#' is not accepted"),
        ("a%2etest", "percent-encoding"),
        ("a .test", "contains ' '"),
        ("a.test\x00", "contains '\\x00'"),
        ("a.test\x85", "contains '\\x85'"),
        ("a.test:", "an empty port"),
        ("a.test:0", "port 0 is out of range"),
        ("a.test:65536", "port 65536 is out of range"),
        ("a.test:+80", "port '+80' is not a number"),
        ("a.test:8O", "port '8O' is not a number"),
        ("::1", "an IPv6 address needs brackets"),
        ("[::1", "'[' without a closing ']'"),
        ("::1]", "needs brackets"),
        ("a.test]", "']' without an opening '['"),
        ("[a.test]", "brackets must enclose an IPv6 address"),
        ("[1.2.3.4]", "brackets must enclose an IPv6 address"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("a..test", "empty label"),
        ("1.2.3.4.5", "ends in a number"),
        ("x" * 64 + ".test", "longer than 63"),
    ],
)
def test_authorities_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidTarget) as caught:
        parse_authority(text)
    assert reason in str(caught.value), caught.value
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://a.test", Target("http", Authority("a.test", None), "/")),
        ("HTTP://a.test:81/x?y#z", Target("http", Authority("a.test", 81), "/x?y#z")),
        ("https://[::1]/p\\q", Target("https", Authority("::1", None), "/p\\q")),
    ],
)
def test_request_targets_accepted(text: str, expected: Target) -> None:
    assert parse_request_target(text) == expected
    assert expected.port == (expected.authority.port or {"http": 80, "https": 443}[expected.scheme])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a.test/x", "not an absolute URL"),
        ("ftp://a.test/", "only http:// and https://"),
        ("http://evil.test\\@allowed.test/", "a backslash"),
        ("http://a.test/x y", "the path contains ' '"),
        ("http://a.test/x\x7f", "the path contains '\\x7f'"),
        ("http:///a.test", "no host"),
    ],
)
def test_request_targets_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidTarget) as caught:
        parse_request_target(text)
    assert reason in str(caught.value)


def test_a_huge_target_gives_a_short_message() -> None:
    with pytest.raises(InvalidTarget) as caught:
        parse_request_target("http://" + "a" * 2_000_000 + "@b.test/")
    assert len(str(caught.value)) < 300 and "(2000007 characters)" in str(caught.value)


AUTHORITY_TEXT = st.lists(
    st.sampled_from([*"ab1.-_:[]@\\?#%/ \t\x00fe0:9", "::", "127.0.0.1", "80", "x" * 63]),
    max_size=12,
).map("".join)


@settings(deadline=None, max_examples=1000)
@given(AUTHORITY_TEXT)
def test_whatever_the_proxy_parser_refuses_is_refused(text: str) -> None:
    """mitmproxy reads the wire; what it answers 400 must never reach a decision here."""
    try:
        ours: Authority | None = parse_authority(text)
    except InvalidTarget:
        ours = None
    try:
        host, port = mitmproxy_parse_authority(text, check=True)
    except ValueError:
        assert ours is None, (text, ours)
        return
    if ours is not None:  # both accept: the same host and port
        assert (ours.host, ours.port) == (host, port)


@settings(deadline=None, max_examples=300)
@given(st.text(max_size=60))
def test_arbitrary_text_is_parsed_or_refused(text: str) -> None:
    for parse in (parse_authority, parse_request_target):
        try:
            parse(text)
        except InvalidTarget as err:
            assert len(str(err)) < 400
