"""Policy.decide, needs_address, combine: the decision semantics of DESIGN.md."""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.engine import Policy, combine, normalize_path
from sidecar.policy.model import (
    Decision,
    Destination,
    IPAddress,
    Mode,
    PolicyMeta,
    Reason,
    Verdict,
)
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore, Snapshot

ALLOW, DENY = Verdict.ALLOW, Verdict.DENY
MATCHED, DENIED, NO_MATCH, PRIVATE, INVALID = (
    Reason.MATCHED_ALLOW,
    Reason.MATCHED_DENY,
    Reason.NO_MATCH,
    Reason.PRIVATE_ADDRESS,
    Reason.INVALID_DESTINATION,
)

DESIGN_DOC = """\
mode: enforce
allow:
  - api.stripe.com
  - "*.googleapis.com"
  - api.github.com:443
  - host: httpbin.org
    ports: [80, 443]
    methods: [GET, HEAD]
    paths: ["/get", "/status/*"]
  - cidr: 203.0.113.0/24
    ports: [5432]
deny:
  - upload.googleapis.com
privateRanges:
  - 10.20.0.0/16
"""
HTTPBIN = "{host: httpbin.org, ports: [80, 443], methods: [GET, HEAD], paths: [/get, /status/*]}"
PG = "{cidr: 203.0.113.0/24, ports: [5432]}"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def load(doc: str) -> Policy:
    return parse_allowlist(doc, source="test")


@dataclass(frozen=True)
class Case:
    dest: Destination
    verdict: Verdict
    reason: Reason
    rule: str | None = None
    detail: str | None = None  # a substring the detail must contain

    def check(self, decision: Decision) -> None:
        assert (decision.verdict, decision.reason, decision.rule) == (
            self.verdict,
            self.reason,
            self.rule,
        ), decision
        if self.detail is not None:
            assert decision.detail is not None and self.detail in decision.detail, decision


def D(  # noqa: N802 (short: the tables read as destinations)
    host: str | None,
    port: int = 443,
    address: str | None = None,
    method: str | None = None,
    path: str | None = None,
) -> Destination:
    return Destination(host, port, ip(address) if address else None, method, path)


DESIGN_CASES = [
    # exact hosts, default ports, case, trailing dot
    Case(D("api.stripe.com"), ALLOW, MATCHED, "api.stripe.com"),
    Case(D("api.stripe.com", 80), ALLOW, MATCHED, "api.stripe.com"),
    Case(D("API.STRIPE.COM."), ALLOW, MATCHED, "api.stripe.com"),
    Case(D("api.stripe.com", 8443), DENY, NO_MATCH, None, "port 8443 not allowed"),
    Case(D("stripe.com"), DENY, NO_MATCH, None, "no allow rule names stripe.com"),
    Case(D("evil.example"), DENY, NO_MATCH, None, "evil.example"),
    # wildcards: any depth, not the apex
    Case(D("storage.googleapis.com"), ALLOW, MATCHED, "*.googleapis.com"),
    Case(D("a.b.c.googleapis.com"), ALLOW, MATCHED, "*.googleapis.com"),
    Case(D("googleapis.com"), DENY, NO_MATCH),
    Case(D("xgoogleapis.com"), DENY, NO_MATCH),
    Case(D("googleapis.com.evil.example"), DENY, NO_MATCH),
    # deny wins, on every port
    Case(D("upload.googleapis.com"), DENY, DENIED, "upload.googleapis.com"),
    Case(D("UPLOAD.googleapis.com.", 8080), DENY, DENIED, "upload.googleapis.com"),
    Case(D("x.upload.googleapis.com"), ALLOW, MATCHED, "*.googleapis.com"),  # deny is exact
    # host:port
    Case(D("api.github.com"), ALLOW, MATCHED, "api.github.com:443"),
    Case(D("api.github.com", 80), DENY, NO_MATCH, None, "port 80 not allowed"),
    # L7 conditions where visible
    Case(D("httpbin.org", 80, method="GET", path="/get"), ALLOW, MATCHED, HTTPBIN),
    Case(D("httpbin.org", 80, method="get", path="/get?x=1"), ALLOW, MATCHED, HTTPBIN),
    Case(D("httpbin.org", 80, method="HEAD", path="/status/418"), ALLOW, MATCHED, HTTPBIN),
    Case(D("httpbin.org", 80, method="GET", path="/status/a/b"), ALLOW, MATCHED, HTTPBIN),
    Case(D("httpbin.org", 80, method="GET", path="/status"), DENY, NO_MATCH, None, "path /status"),
    Case(
        D("httpbin.org", 80, method="POST", path="/get"),
        DENY,
        NO_MATCH,
        None,
        f'method POST not allowed by "{HTTPBIN}"',
    ),
    Case(D("httpbin.org", 80, method="GET", path="/post"), DENY, NO_MATCH, None, "path /post"),
    Case(D("httpbin.org", 80, method="GET", path="/get/../post"), DENY, NO_MATCH),
    Case(D("httpbin.org", 80, method="GET", path="/%67et"), ALLOW, MATCHED, HTTPBIN),
    # CONNECT or TLS: the rule's methods and paths cannot be seen, so it grants nothing there
    Case(D("httpbin.org", 443), DENY, Reason.L7_NOT_VISIBLE, None, "methods and paths"),
    Case(D("httpbin.org", 8080), DENY, NO_MATCH, None, "port 8080"),
    # cidr rule by address
    Case(D(None, 5432, "203.0.113.5"), ALLOW, MATCHED, PG),
    Case(D("203.0.113.5", 5432), ALLOW, MATCHED, PG),
    Case(D("203.0.113.5", 443), DENY, PRIVATE, None, "203.0.113.5 is reserved"),  # wrong port
    Case(D(None, 443, "8.8.8.8"), DENY, NO_MATCH, None, "no allow rule matches 8.8.8.8"),
    # the guard
    Case(D("api.stripe.com", 443, "54.187.174.169"), ALLOW, MATCHED, "api.stripe.com"),
    Case(D("api.stripe.com", 443, "10.0.0.1"), DENY, PRIVATE, None, "10.0.0.1 is private"),
    Case(D("api.stripe.com", 443, "10.20.3.4"), ALLOW, MATCHED, "api.stripe.com"),  # range
    Case(D("evil.example", 443, "10.20.3.4"), DENY, NO_MATCH),  # range: host rules decide
    Case(D("api.stripe.com", 443, "127.0.0.1"), DENY, PRIVATE, None, "127.0.0.1 is loopback"),
    Case(
        D("api.stripe.com", 443, "169.254.169.254"),
        DENY,
        PRIVATE,
        None,
        "169.254.169.254 is cloud metadata",
    ),
    Case(D("api.stripe.com", 443, "198.18.0.5"), DENY, PRIVATE, None, "198.18.0.5 is reserved"),
    # a cidr rule decides for a non-public address it names
    Case(D("db.internal", 5432, "203.0.113.9"), ALLOW, MATCHED, PG),
    Case(D("api.stripe.com", 5432, "203.0.113.9"), ALLOW, MATCHED, PG),
    Case(D("api.stripe.com", 443, "203.0.113.9"), DENY, PRIVATE, None, "reserved"),
    # IP literals are addresses
    Case(D("10.0.0.1"), DENY, PRIVATE, None, "10.0.0.1 is private"),
    Case(D("127.1", 80), DENY, PRIVATE, None, "127.0.0.1 is loopback"),
    Case(D("[::1]", 80), DENY, PRIVATE, None, "::1 is loopback"),
    Case(D("::ffff:169.254.169.254", 80), DENY, PRIVATE, None, "cloud metadata"),
    Case(D("8.8.8.8"), DENY, NO_MATCH),
    Case(D("10.20.0.7"), DENY, NO_MATCH),  # in privateRanges but no rule names it
    # invalid destinations
    Case(D("exa mple.com"), DENY, INVALID, None, "'exa mple.com'"),
    Case(D(""), DENY, INVALID, None, "empty host"),
    Case(D("api.stripe.com", 0), DENY, INVALID, None, "port 0"),
    Case(D("api.stripe.com", 70000), DENY, INVALID, None, "port 70000"),
    Case(D(None), DENY, INVALID, None, "no host and no address"),
]


@pytest.fixture(scope="module")
def design() -> Policy:
    return load(DESIGN_DOC)


@pytest.mark.parametrize("case", DESIGN_CASES, ids=lambda c: f"{c.dest.host}:{c.dest.port}")
def test_design_example(design: Policy, case: Case) -> None:
    case.check(design.decide(case.dest))


GUARD_DOC = """\
allow:
  - app.example.com
  - "*.example.com"
  - {cidr: 10.1.0.0/16, ports: [5432]}
  - {cidr: "fd00:1::/32"}
  - cidr: 192.168.7.7
deny:
  - cidr: 10.1.2.0/24
  - {cidr: "2001:db8:dead::/48"}
privateRanges:
  - 100.64.0.0/10
  - fd00:2::/32
"""


@pytest.mark.parametrize(
    ("address", "verdict", "reason", "detail"),
    [
        ("93.184.216.34", ALLOW, MATCHED, None),
        ("2606:2800:220:1::1", ALLOW, MATCHED, None),
        ("127.0.0.1", DENY, PRIVATE, "127.0.0.1 is loopback"),
        ("0.0.0.0", DENY, PRIVATE, "0.0.0.0 is unspecified"),
        ("10.0.0.1", DENY, PRIVATE, "10.0.0.1 is private"),
        ("172.20.0.1", DENY, PRIVATE, "172.20.0.1 is private"),
        ("192.168.0.1", DENY, PRIVATE, "192.168.0.1 is private"),
        ("169.254.1.1", DENY, PRIVATE, "169.254.1.1 is link-local"),
        ("169.254.169.254", DENY, PRIVATE, "169.254.169.254 is cloud metadata"),
        ("100.64.1.1", ALLOW, MATCHED, None),  # CGNAT, but listed in privateRanges
        ("224.0.0.1", DENY, PRIVATE, "multicast"),
        ("255.255.255.255", DENY, PRIVATE, "reserved"),
        ("192.0.2.1", DENY, PRIVATE, "reserved"),
        ("198.18.0.1", DENY, PRIVATE, "198.18.0.1 is reserved"),
        ("::1", DENY, PRIVATE, "::1 is loopback"),
        ("::", DENY, PRIVATE, ":: is unspecified"),
        ("fe80::1", DENY, PRIVATE, "link-local"),
        ("fd12::1", DENY, PRIVATE, "unique-local"),
        ("fd00:2::5", ALLOW, MATCHED, None),  # unique-local in privateRanges
        ("fd00:ec2::254", DENY, PRIVATE, "fd00:ec2::254 is cloud metadata"),
        ("ff02::1", DENY, PRIVATE, "multicast"),
        ("2001:db8::1", DENY, PRIVATE, "reserved"),
        ("::ffff:127.0.0.1", DENY, PRIVATE, "loopback (embeds 127.0.0.1)"),
        ("::ffff:10.0.0.1", DENY, PRIVATE, "private (embeds 10.0.0.1)"),
        ("2002:a00:1::1", DENY, PRIVATE, "private (embeds 10.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", DENY, PRIVATE, "cloud metadata (embeds 169.254.169.254)"),
        ("64:ff9b::100.64.0.1", DENY, PRIVATE, "carrier-grade NAT"),  # not the v4 range listed
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", DENY, PRIVATE, "loopback (embeds 127.0.0.1)"),
    ],
)
def test_guard_for_every_class(
    address: str, verdict: Verdict, reason: Reason, detail: str | None
) -> None:
    policy = load(GUARD_DOC)
    decision = policy.decide(D("app.example.com", 443, address))
    assert (decision.verdict, decision.reason) == (verdict, reason), decision
    if detail is not None:
        assert decision.detail is not None and detail in decision.detail
    # the same address without a name: only cidr rules could allow it
    bare = policy.decide(D(None, 443, address))
    assert bare.verdict is DENY
    if reason is PRIVATE:
        assert bare.reason is PRIVATE
    else:
        assert bare.reason is NO_MATCH


@pytest.mark.parametrize(
    "case",
    [
        # a cidr allow rule decides for a private address it names (address + port)
        Case(
            D("app.example.com", 5432, "10.1.9.9"),
            ALLOW,
            MATCHED,
            "{cidr: 10.1.0.0/16, ports: [5432]}",
        ),
        Case(
            D("other.test", 5432, "10.1.9.9"), ALLOW, MATCHED, "{cidr: 10.1.0.0/16, ports: [5432]}"
        ),
        Case(D(None, 5432, "10.1.9.9"), ALLOW, MATCHED, "{cidr: 10.1.0.0/16, ports: [5432]}"),
        Case(
            D(None, 5432, "::ffff:10.1.9.9"), ALLOW, MATCHED, "{cidr: 10.1.0.0/16, ports: [5432]}"
        ),
        Case(D("app.example.com", 443, "10.1.9.9"), DENY, PRIVATE, None, "10.1.9.9 is private"),
        Case(D(None, 443, "10.1.9.9"), DENY, PRIVATE, None, "10.1.9.9 is private"),
        Case(D("10.1.9.9", 5432), ALLOW, MATCHED, "{cidr: 10.1.0.0/16, ports: [5432]}"),
        # a cidr deny rule wins, by name too
        Case(D("app.example.com", 5432, "10.1.2.3"), DENY, DENIED, "{cidr: 10.1.2.0/24}"),
        Case(D(None, 5432, "10.1.2.3"), DENY, DENIED, "{cidr: 10.1.2.0/24}"),
        Case(D(None, 5432, "::ffff:10.1.2.3"), DENY, DENIED, "{cidr: 10.1.2.0/24}"),
        Case(
            D("app.example.com", 443, "2001:db8:dead::1"),
            DENY,
            DENIED,
            "{cidr: 2001:db8:dead::/48}",
        ),
        # v6 cidr rules, default ports 80 and 443
        Case(D(None, 443, "fd00:1::9"), ALLOW, MATCHED, "{cidr: fd00:1::/32}"),
        Case(D("[fd00:1::9]", 80), ALLOW, MATCHED, "{cidr: fd00:1::/32}"),
        Case(D(None, 22, "fd00:1::9"), DENY, PRIVATE, None, "fd00:1::9 is unique-local"),
        # an IP string rule is a /32 cidr rule
        Case(D("192.168.7.7", 443), ALLOW, MATCHED, "{cidr: 192.168.7.7}"),
        Case(D("192.168.7.8", 443), DENY, PRIVATE),
        # public address, no host rule: a cidr rule may still allow it
        Case(D("unknown.test", 443, "8.8.8.8"), DENY, NO_MATCH, None, "unknown.test"),
    ],
    ids=lambda c: f"{c.dest.host}:{c.dest.port}@{c.dest.address}",
)
def test_cidr_rules_and_guard(case: Case) -> None:
    case.check(load(GUARD_DOC).decide(case.dest))


def test_public_cidr_rule_allows_when_no_host_rule_matched() -> None:
    policy = load("allow: [{cidr: 8.8.8.0/24, ports: [53, 443]}, api.example.com]")
    rule = "{cidr: 8.8.8.0/24, ports: [53, 443]}"
    Case(D("dns.google", 53, "8.8.8.8"), ALLOW, MATCHED, rule).check(
        policy.decide(D("dns.google", 53, "8.8.8.8"))
    )
    Case(D("x", 53), DENY, NO_MATCH, None, "port 53 not allowed").check(
        policy.decide(D("api.example.com", 53, "8.8.4.4"))
    )
    # the host decision stands when it allows
    Case(D("x"), ALLOW, MATCHED, "api.example.com").check(
        policy.decide(D("api.example.com", 443, "8.8.8.8"))
    )


def test_ip_literal_and_connect_address_both_vetted() -> None:
    policy = load("allow: [{cidr: 8.8.8.0/24}]")
    assert policy.decide(D("8.8.8.8", 443, "8.8.8.8")).verdict is ALLOW
    # the literal is allowed, but the proxy would connect to a loopback address
    decision = policy.decide(D("8.8.8.8", 443, "127.0.0.1"))
    assert (decision.verdict, decision.reason) == (DENY, PRIVATE)


IDN_DOC = """\
allow:
  - bücher.example
  - "*.xn--mnchen-3ya.example"
  - Shop.Example.COM.
deny:
  - "*.Ads.Example.Com"
"""


@pytest.mark.parametrize(
    ("host", "verdict", "rule"),
    [
        ("bücher.example", ALLOW, "bücher.example"),
        ("xn--bcher-kva.example", ALLOW, "bücher.example"),
        ("BÜCHER.EXAMPLE.", ALLOW, "bücher.example"),
        ("www.münchen.example", ALLOW, "*.xn--mnchen-3ya.example"),
        ("www.xn--mnchen-3ya.example", ALLOW, "*.xn--mnchen-3ya.example"),
        ("münchen.example", DENY, None),
        ("shop.example.com", ALLOW, "Shop.Example.COM."),
        ("x.ads.example.com", DENY, "*.Ads.Example.Com"),
        ("ads.example.com", DENY, None),
    ],
)
def test_idn_case_and_trailing_dot_in_rules_and_requests(
    host: str, verdict: Verdict, rule: str | None
) -> None:
    decision = load(IDN_DOC).decide(D(host))
    assert (decision.verdict, decision.rule) == (verdict, rule)


FILES = "{host: files.example.com, methods: [GET, PUT, DELETE]}"
DENY_DOC = """\
allow:
  - "*.example.com"
  - secret.example.com
  - api.example.com
  - host: files.example.com
    methods: [GET, PUT, DELETE]
deny:
  - "*.internal.example.com"
  - secret.example.com
  - api.example.com:8443
  - host: files.example.com
    methods: [DELETE]
  - host: api.example.com
    paths: ["/admin/*"]
"""


@pytest.mark.parametrize(
    "case",
    [
        # a wildcard deny beats an exact allow; an exact deny beats a wildcard and exact allow
        Case(D("db.internal.example.com"), DENY, DENIED, "*.internal.example.com"),
        Case(D("secret.example.com"), DENY, DENIED, "secret.example.com"),
        Case(D("secret.example.com", 9999), DENY, DENIED, "secret.example.com"),
        Case(D("internal.example.com"), ALLOW, MATCHED, "*.example.com"),
        # a deny with a port applies to that port only
        Case(D("api.example.com", 8443), DENY, DENIED, "api.example.com:8443"),
        Case(D("api.example.com", 443), ALLOW, MATCHED, "api.example.com"),
        # deny L7 conditions apply only where the request is visible
        Case(
            D("files.example.com", 80, method="DELETE", path="/a"),
            DENY,
            DENIED,
            "{host: files.example.com, methods: [DELETE]}",
        ),
        # CONNECT: the methods rule cannot grant it; the wildcard without L7 conditions does
        Case(D("files.example.com", 443), ALLOW, MATCHED, "*.example.com"),
        Case(D("files.example.com", 80, method="GET", path="/a"), ALLOW, MATCHED, FILES),
        # the exact rule does not take POST, the wildcard rule does: any match allows
        Case(D("files.example.com", 80, method="POST"), ALLOW, MATCHED, "*.example.com"),
        Case(
            D("api.example.com", 80, method="GET", path="/admin/users"),
            DENY,
            DENIED,
            "{host: api.example.com, paths: [/admin/*]}",
        ),
        Case(
            D("api.example.com", 80, method="GET", path="/x/../admin/users"),
            DENY,
            DENIED,
            "{host: api.example.com, paths: [/admin/*]}",
        ),
        Case(
            D("api.example.com", 80, method="GET", path="/%61dmin/users"),
            DENY,
            DENIED,
            "{host: api.example.com, paths: [/admin/*]}",
        ),
        Case(
            D("api.example.com", 80, method="GET", path="//admin/users"),
            DENY,
            DENIED,
            "{host: api.example.com, paths: [/admin/*]}",
        ),
        Case(
            D("api.example.com", 80, method="GET", path="/public"),
            ALLOW,
            MATCHED,
            "api.example.com",
        ),
    ],
    ids=lambda c: f"{c.dest.host}:{c.dest.port}{c.dest.path or ''}",
)
def test_deny_over_allow(case: Case) -> None:
    case.check(load(DENY_DOC).decide(case.dest))


L7_DOC = """\
allow:
  - {host: web.example.com, ports: [80], methods: [GET], paths: ["/ok/*"]}
  - {host: get.example.com, methods: [GET]}
  - {host: path.example.com, paths: [/v1/*]}
  - {host: both.example.com, ports: [80], methods: [GET]}
  - {host: both.example.com, ports: [80, 443]}
  - {host: cidr.example.com, methods: [GET]}
  - {cidr: 198.51.100.0/24, ports: [443]}
  - {cidr: 192.0.2.0/24, ports: [443], methods: [GET]}
privateRanges: [198.51.100.0/24, 192.0.2.0/24]
"""
L7_NOT_VISIBLE = Reason.L7_NOT_VISIBLE
WEB_RULE = "{host: web.example.com, ports: [80], methods: [GET], paths: [/ok/*]}"


@pytest.mark.parametrize(
    "case",
    [
        # opaque (method and path None): CONNECT tunnels, transparent TLS and TCP
        Case(D("web.example.com", 80), DENY, L7_NOT_VISIBLE, None, "methods and paths"),
        Case(D("get.example.com", 443), DENY, L7_NOT_VISIBLE, None, "only some methods,"),
        Case(D("path.example.com", 443), DENY, L7_NOT_VISIBLE, None, "only some paths,"),
        # the same rules where the request is visible
        Case(D("web.example.com", 80, method="GET", path="/ok/1"), ALLOW, MATCHED, WEB_RULE),
        Case(D("web.example.com", 80, method="POST", path="/admin"), DENY, NO_MATCH),
        # a path rule with only a method visible still cannot see the path
        Case(D("path.example.com", 80, method="GET"), DENY, L7_NOT_VISIBLE),
        # another rule without L7 conditions still allows the tunnel
        Case(
            D("both.example.com", 80), ALLOW, MATCHED, "{host: both.example.com, ports: [80, 443]}"
        ),
        # a port the L7 rule does not take is still reported as the port
        Case(D("web.example.com", 8080), DENY, NO_MATCH, None, "port 8080"),
        # cidr rules: the same, by address
        Case(D("cidr.example.com", 443, "198.51.100.7"), ALLOW, MATCHED),
        Case(D("cidr.example.com", 443, "203.0.113.9"), DENY, Reason.PRIVATE_ADDRESS),
        Case(D(None, 443, "192.0.2.5"), DENY, L7_NOT_VISIBLE, None, "only some methods"),
        Case(D(None, 443, "192.0.2.5", method="GET", path="/"), ALLOW, MATCHED),
    ],
    ids=lambda c: f"{c.dest.host or c.dest.address}:{c.dest.port}:{c.dest.method}",
)
def test_l7_rules_grant_no_opaque_channel(case: Case) -> None:
    decision = load(L7_DOC).decide(case.dest)
    if case.rule is None and case.verdict is ALLOW:
        assert (decision.verdict, decision.reason) == (ALLOW, MATCHED), decision
    else:
        case.check(decision)


def test_an_l7_rules_host_may_still_be_allowed_by_a_cidr_rule() -> None:
    """Resolving is still worth it: a cidr rule without L7 conditions may allow the address."""
    policy = load(L7_DOC)
    dest = D("cidr.example.com", 443)
    by_name = policy.decide(dest)
    assert by_name.reason is L7_NOT_VISIBLE
    assert policy.needs_address(dest, by_name)


def test_several_rules_for_one_host_any_match_allows() -> None:
    policy = load(
        """
allow:
  - {host: api.example.com, ports: [8080], methods: [POST]}
  - {host: api.example.com, ports: [80], paths: [/v1/*]}
"""
    )
    assert policy.decide(D("api.example.com", 8080, method="POST", path="/x")).permits
    assert policy.decide(D("api.example.com", 80, method="POST", path="/v1/a")).permits
    denied = policy.decide(D("api.example.com", 80, method="POST", path="/v2/a"))
    assert (denied.verdict, denied.reason) == (DENY, NO_MATCH)
    assert denied.detail is not None and "path /v2/a not allowed" in denied.detail


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/get", "/get", True),
        ("/get", "/get/", False),
        ("/get", "/getx", False),
        ("/status/*", "/status/", True),
        ("/status/*", "/status/200/x", True),
        ("/status/*", "/status", False),
        ("/a/*/c", "/a/b/c", True),
        ("/a/*/c", "/a/b/b/c", True),
        ("/a/*/c", "/a/c", False),
        ("/*.json", "/x/y.json", True),
        ("/*.json", "/x/y.jsonp", False),
        ("/a*b*c", "/abc", True),
        ("/a*b*c", "/acb", False),
        ("/v1/*", "/v1/x?y=1", True),
        ("/v1/*", "/v1%2fx", False),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    policy = load(f'allow: [{{host: h.test, paths: ["{pattern}"]}}]')
    assert policy.decide(D("h.test", 80, method="GET", path=path)).permits is matches


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b?c#d", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/../../etc", "/etc"),
        ("/%7Euser/%2f", "/~user/%2F"),
        ("/a/..", "/"),
        ("//admin///x", "/admin/x"),
        ("", ""),
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


# -- needs_address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "dest", "expected"),
    [
        ("allow: [a.test]", D("a.test"), True),  # permitted by name: vet the address
        ("allow: [a.test]", D("b.test"), False),  # no match and no cidr rule could change it
        ("allow: [a.test, {cidr: 8.8.8.0/24}]", D("b.test"), True),  # a cidr rule on 443
        ("allow: [a.test, {cidr: 8.8.8.0/24, ports: [53]}]", D("b.test"), False),  # not this port
        ("allow: [a.test, {cidr: 8.8.8.0/24, ports: [53]}]", D("b.test", 53), True),
        ("{allow: ['*.test'], deny: [b.test]}", D("b.test"), False),  # denied by name
        ("{allow: ['*.test', {cidr: 1.0.0.0/8}], deny: [b.test]}", D("b.test"), False),
        ("allow: [{cidr: 8.8.8.0/24}]", D("8.8.8.8"), True),  # permitted literal: the address
        ("allow: [{cidr: 8.8.8.0/24}]", D("0x8080808"), True),  # ... however it is spelled
        ("allow: [{cidr: 8.8.8.0/24}]", D("8.8.4.4"), False),  # a literal already decided
        ("allow: [a.test]", D("a.test", 443, "1.2.3.4"), True),  # may dial a vetted address
        ("allow: [a.test]", D("a.test", 443, "10.0.0.1"), False),  # guard denied: no change
        ("allow: [a.test]", D("bad host"), False),
        ("allow: [a.test]", D(None, 443, "1.2.3.4"), False),
    ],
)
def test_needs_address(doc: str, dest: Destination, expected: bool) -> None:
    policy = load(doc)
    assert policy.needs_address(dest, policy.decide(dest)) is expected


def test_store_resolves_and_vets_through_policy() -> None:
    """The store's contract with the proxy: by name, then the resolved addresses in order."""
    store = PolicyStore()
    snapshot = store.set_policy(load("allow: [a.test]"))
    dest = D("a.test")
    by_name = snapshot.decide(dest)
    assert by_name.permits and snapshot.needs_address(dest, by_name)
    decision, address = snapshot.decide_resolved(dest, [ip("10.0.0.1"), ip("93.184.216.34")])
    assert decision.verdict is ALLOW and address == ip("93.184.216.34")
    decision, address = snapshot.decide_resolved(dest, [ip("127.0.0.1")])
    assert (decision.reason, address) == (PRIVATE, None)
    audit = Snapshot(load("mode: audit\nallow: [a.test]"), None)
    assert audit.decide(D("b.test")).verdict is Verdict.AUDIT


# -- building policies ------------------------------------------------------------------------


def test_with_extra_private_ranges_lets_host_rules_decide() -> None:
    policy = load("allow: [upstream.test]")
    dest = D("upstream.test", 443, "198.18.0.10")
    assert policy.decide(dest).reason is PRIVATE
    widened = policy.with_extra_private_ranges([ipaddress.ip_network("198.18.0.0/15")])
    assert widened.decide(dest).verdict is ALLOW
    assert widened.decide(D("other.test", 443, "198.18.0.10")).reason is NO_MATCH
    assert widened.private_ranges == (ipaddress.ip_network("198.18.0.0/15"),)
    assert policy.private_ranges == ()  # the original is untouched
    assert widened.meta == policy.meta


def test_policy_is_immutable() -> None:
    policy = load("allow: [a.test]")
    with pytest.raises(AttributeError):
        policy.meta = PolicyMeta("x", "y")
    assert policy.rule_count == 1


def test_empty_policy_denies_everything() -> None:
    policy = Policy.empty(PolicyMeta("empty", "0"))
    for dest in (D("a.test"), D(None, 443, "8.8.8.8"), D("8.8.8.8")):
        decision = policy.decide(dest)
        assert (decision.verdict, decision.reason) == (DENY, NO_MATCH)
    assert policy.decide(D(None, 443, "10.0.0.1")).reason is PRIVATE
    assert policy.rule_count == 0


def test_combine_unions_rules_and_mode() -> None:
    a = parse_allowlist("mode: audit\nallow: [a.test, '*.shared.test']", source="cm:a", version="1")
    b = parse_allowlist(
        "allow: [b.test]\ndeny: [x.shared.test]\nprivateRanges: [10.0.0.0/8]",
        source="cm:b",
        version="2",
    )
    c = parse_allowlist("mode: enforce\nallow: [c.test]", source="cm:c", version="3")
    d = parse_allowlist("mode: audit\nallow: [d.test]", source="cm:d", version="4")

    ab = combine([a, b])
    assert (ab.meta.source, ab.meta.version, ab.meta.mode) == ("cm:a,cm:b", "1,2", Mode.AUDIT)
    assert ab.decide(D("a.test")).permits and ab.decide(D("b.test")).permits
    assert ab.decide(D("x.shared.test")).reason is DENIED  # a deny from b beats an allow from a
    assert ab.decide(D("y.shared.test")).permits
    assert ab.decide(D("a.test", 443, "10.1.1.1")).permits  # b's privateRanges apply
    assert ab.rule_count == 4

    assert combine([a, c, d]).meta.mode is Mode.ENFORCE
    assert combine([a, d]).meta.mode is Mode.AUDIT
    assert combine([b]).meta.mode is None
    assert combine([a, b], source="configmaps").meta.source == "configmaps"
    empty = combine([])
    assert empty.decide(D("a.test")).reason is NO_MATCH


# -- properties -------------------------------------------------------------------------------

# Labels of names (not of numeric IPv4 spellings: a last label like "12" or "0x1f" makes the
# whole host an address, as in browsers).
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not re.fullmatch(r"[0-9]+|0x[0-9a-f]*", s)
)
HOSTS = st.lists(LABEL, min_size=2, max_size=6).map(".".join)


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(HOSTS, st.sampled_from([80, 443]))
def test_hosts_match_own_rule_and_wildcard_parent_never_apex(host: str, port: int) -> None:
    parent = host.split(".", 1)[1]
    policy = load(f'allow: ["{host}"]')
    assert policy.decide(D(host, port)).verdict is ALLOW
    assert policy.decide(D(host.upper() + ".", port)).verdict is ALLOW
    # broad: the parent may be a public suffix ("*.ba"), which a rule must opt into.
    wildcard = load(f'allow: [{{host: "*.{parent}", broad: true}}]')
    matched = wildcard.decide(D(host, port))
    assert matched.verdict is ALLOW and f"*.{parent}" in (matched.rule or "")
    assert wildcard.decide(D("deeper." + host, port)).verdict is ALLOW
    assert wildcard.decide(D(parent, port)).verdict is DENY  # never the apex
    apex = load(f'allow: [{{host: "*.{host}", broad: true}}]')
    assert apex.decide(D(host, port)).verdict is DENY


POLICIES = (load(DESIGN_DOC), load(GUARD_DOC), load(DENY_DOC))
ADDRESSES = st.one_of(st.none(), st.ip_addresses())
DESTINATIONS = st.builds(
    Destination,
    host=st.one_of(st.none(), st.text(max_size=30), HOSTS, st.ip_addresses().map(str)),
    port=st.integers(min_value=-10, max_value=70000),
    address=ADDRESSES,
    method=st.one_of(st.none(), st.text(max_size=8)),
    path=st.one_of(st.none(), st.text(max_size=30), st.just("/status/1")),
)


@settings(deadline=None, max_examples=300)
@given(DESTINATIONS)
def test_decide_never_raises(dest: Destination) -> None:
    for policy in POLICIES:
        decision = policy.decide(dest)
        assert isinstance(decision, Decision)
        if decision.verdict is ALLOW:
            assert decision.rule is not None
        policy.needs_address(dest, decision)


# -- cost does not grow with the allowlist ------------------------------------------------------


def _big_doc(n: int) -> str:
    lines = ["allow:"]
    for i in range(n):
        kind = i % 3
        if kind == 0:
            lines.append(f"  - host{i}.svc{i % 97}.example.com")
        elif kind == 1:
            lines.append(f'  - "*.tenant{i}.example.net"')
        else:
            lines.append(f"  - {{cidr: 10.{(i >> 8) & 255}.{i & 255}.0/24, ports: [5432]}}")
    lines += ["deny:", "  - blocked.example.com", "  - {cidr: 192.168.0.0/16}"]
    return "\n".join(lines) + "\n"


def _cost(policy: Policy, dests: list[Destination], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for dest in dests:
            policy.decide(dest)
        best = min(best, time.perf_counter() - start)
    return best / len(dests)


def test_decision_cost_does_not_grow_with_rule_count() -> None:
    small, large = load(_big_doc(10)), load(_big_doc(10_000))
    assert large.rule_count == 10_002
    dests = [
        D("host3.svc3.example.com"),
        D("a.b.tenant4.example.net"),
        D("x.y.z.unknown.example.org"),
        D("host9999.svc9.example.com", 443, "93.184.216.34"),
        D(None, 5432, "10.0.5.9"),
        D(None, 5432, "10.39.15.1"),
        D("deep.a.b.c.d.e.f.example.com", 443, "10.0.0.1"),
        D("blocked.example.com"),
    ] * 250
    # interleaved rounds, best of each: noise from other processes hits both alike
    small_cost = large_cost = float("inf")
    for _ in range(3):
        small_cost = min(small_cost, _cost(small, dests, rounds=2))
        large_cost = min(large_cost, _cost(large, dests, rounds=2))
    assert large_cost < 5 * small_cost, (small_cost, large_cost)
    assert large_cost < 100e-6  # and absolutely cheap: well under 100 µs per decision
