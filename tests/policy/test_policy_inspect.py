"""`inspect: true` in the pure core: what validate refuses, which hosts are inspected, and how
methods/paths then apply to the channel and to each HTTPS request inside it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.engine import Policy
from sidecar.policy.errors import AllowlistError
from sidecar.policy.model import Destination, Reason, Verdict
from sidecar.policy.parse import parse_allowlist, validate_text
from sidecar.policy.store import PolicyStore

DOC = """\
allow:
  - {host: api.stripe.com, inspect: true, methods: [POST], paths: ["/v1/charges"]}
  - {host: api.stripe.com, inspect: true, methods: [GET], paths: ["/v1/customers/*"]}
  - "*.example.com"
  - {host: "*.inspected.test", inspect: true, methods: [GET, HEAD]}
  - plain.inspected.test
  - {host: wide.test, inspect: true, ports: [8443]}
  - {host: l7only.test, methods: [GET]}
deny:
  - {host: api.stripe.com, paths: ["/v1/admin/*"]}
  - blocked.inspected.test
"""


def policy(text: str = DOC) -> Policy:
    return parse_allowlist(text, source="test", version="1")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            "allow:\n  - {cidr: 10.0.0.0/8, inspect: true}\n",
            'allow rule 1 "{cidr: 10.0.0.0/8, inspect: true}": inspect: true applies to host '
            "rules only",
        ),
        (
            "allow:\n  - a.test\n  - {host: 203.0.113.7, inspect: true}\n",
            'allow rule 2 "{host: 203.0.113.7, inspect: true}": inspect: true applies to host '
            "rules only",
        ),
        (
            "allow:\n  - a.test\ndeny:\n  - b.test\n  - {host: c.test, inspect: true}\n",
            'deny rule 2 "{host: c.test, inspect: true}": inspect: true applies to allow rules '
            "only",
        ),
        ("allow:\n  - {host: a.test, inspect: 1}\n", "inspect must be true or false"),
        ("allow:\n  - {host: a.test, inspekt: true}\n", 'did you mean "inspect"'),
    ],
)
def test_validate_refuses_inspect_outside_host_allow_rules(doc: str, message: str) -> None:
    found = validate_text(doc, source="t")
    assert len(found) == 1, found
    assert message in found[0].message
    assert found[0].line is not None


def test_inspect_false_and_true_parse() -> None:
    p = policy("allow:\n  - {host: a.test, inspect: false}\n  - {host: b.test, inspect: true}\n")
    assert [r.inspect for r in p.allow_rules] == [False, True]
    # Same host with and without inspect: two rules, not a duplicate.
    assert not validate_text("allow:\n  - a.test\n  - {host: a.test, inspect: true}\n", source="t")
    with pytest.raises(AllowlistError):
        policy("allow:\n  - {host: a.test, inspect: true}\n  - {host: a.test, inspect: true}\n")


@pytest.mark.parametrize(
    ("host", "port", "inspected_by"),
    [
        ("api.stripe.com", 443, "POST"),
        ("API.Stripe.COM.", 443, "POST"),  # normalized
        ("api.stripe.com", 80, "POST"),  # default ports 80, 443
        ("api.stripe.com", 8443, None),  # no rule takes the port
        ("a.example.com", 443, None),
        ("x.inspected.test", 443, "GET, HEAD"),
        ("deep.x.inspected.test", 443, "GET, HEAD"),
        ("inspected.test", 443, None),  # wildcards never match the apex
        ("plain.inspected.test", 443, None),  # the exact rule, without inspect, wins
        ("wide.test", 8443, "8443"),
        ("wide.test", 443, None),
        ("l7only.test", 443, None),
        ("203.0.113.7", 443, None),
        ("bad host", 443, None),
    ],
)
def test_which_hosts_are_inspected(host: str, port: int, inspected_by: str | None) -> None:
    rule = policy().inspection(host, port)
    if inspected_by is None:
        assert rule is None
    else:
        assert rule is not None and inspected_by in rule.text


A, D = Verdict.ALLOW, Verdict.DENY


@pytest.mark.parametrize(
    ("dest", "verdict", "reason"),
    [
        # The channel (CONNECT authority / SNI): granted, the conditions deferred to requests.
        (Destination("api.stripe.com", 443, inspected=True), A, Reason.MATCHED_ALLOW),
        # The same channel not inspected: the conditions cannot be seen, as before.
        (Destination("api.stripe.com", 443), D, Reason.L7_NOT_VISIBLE),
        (Destination("x.inspected.test", 443, inspected=True), A, Reason.MATCHED_ALLOW),
        (Destination("blocked.inspected.test", 443, inspected=True), D, Reason.MATCHED_DENY),
        (Destination("api.stripe.com", 8443, inspected=True), D, Reason.NO_MATCH),
        # Each request inside the inspected TLS.
        (Destination("api.stripe.com", 443, None, "POST", "/v1/charges"), A, Reason.MATCHED_ALLOW),
        (Destination("api.stripe.com", 443, None, "GET", "/v1/charges"), D, Reason.NO_MATCH),
        (Destination("api.stripe.com", 443, None, "DELETE", "/v1/charges"), D, Reason.NO_MATCH),
        (Destination("api.stripe.com", 443, None, "GET", "/v1/customers/c1"), A, None),
        (Destination("api.stripe.com", 443, None, "GET", "/v1/customers/../admin"), D, None),
        (Destination("api.stripe.com", 443, None, "POST", "/v1/admin/x"), D, Reason.MATCHED_DENY),
        (Destination("x.inspected.test", 443, None, "HEAD", "/"), A, Reason.MATCHED_ALLOW),
        (Destination("x.inspected.test", 443, None, "PUT", "/"), D, Reason.NO_MATCH),
        # Deferral is for inspected channels only: a plain L7 rule still needs what it checks.
        (Destination("l7only.test", 443, inspected=False), D, Reason.L7_NOT_VISIBLE),
    ],
)
def test_channel_and_request_decisions(
    dest: Destination, verdict: Verdict, reason: Reason | None
) -> None:
    decision = policy().decide(dest)
    assert decision.verdict is verdict, decision
    if reason is not None:
        assert decision.reason is reason, decision


def test_snapshot_names_the_inspecting_rule() -> None:
    store = PolicyStore()
    assert store.get().inspection("api.stripe.com", 443) is None  # no policy yet
    snap = store.set_policy(policy())
    assert (
        snap.inspection("x.inspected.test", 443)
        == "{host: *.inspected.test, inspect: true, methods: [GET, HEAD]}"
    )
    assert snap.inspection(None, 443) is None
    assert snap.inspection("a.example.com", 443) is None


# -- properties ----------------------------------------------------------------------------------

_HOSTS = st.sampled_from(["a.test", "b.a.test", "c.b.a.test", "x.test"])
_METHODS = st.sampled_from(["GET", "POST", "PUT"])
_PATHS = st.sampled_from(["/", "/v1", "/v1/x", "/admin"])


@st.composite
def _allowlists(draw: st.DrawFn) -> str:
    rules = []
    for _ in range(draw(st.integers(1, 5))):
        host = draw(st.sampled_from(["a.test", "*.a.test", "b.a.test", "*.b.a.test", "x.test"]))
        parts = [f'host: "{host}"']
        if draw(st.booleans()):
            parts.append("inspect: true")
        if draw(st.booleans()):
            parts.append(f"methods: [{draw(_METHODS)}]")
        if draw(st.booleans()):
            parts.append(f'paths: ["{draw(_PATHS)}*"]')
        if draw(st.booleans()):
            parts.append(f"ports: [{draw(st.sampled_from([443, 8443]))}]")
        rules.append("  - {" + ", ".join(parts) + "}")
    deny = ""
    if draw(st.booleans()):
        deny = f'deny:\n  - {{host: "{draw(_HOSTS)}", methods: [{draw(_METHODS)}]}}\n'
    return "allow:\n" + "\n".join(dict.fromkeys(rules)) + "\n" + deny


@settings(deadline=None, max_examples=300)
@given(
    doc=_allowlists(),
    host=_HOSTS,
    port=st.sampled_from([443, 8443]),
    method=_METHODS,
    path=_PATHS,
)
def test_an_allowed_request_implies_an_allowed_channel(
    doc: str, host: str, port: int, method: str, path: str
) -> None:
    """What an inspected channel grants covers every request allowed inside it, so a request
    the rules allow is never refused at the channel."""
    p = policy(doc)
    request = p.decide(Destination(host, port, None, method, path))
    channel = p.decide(Destination(host, port, inspected=True))
    if request.permits:
        assert channel.permits, (request, channel)
    # Deferring conditions never turns a plain (uninspected) channel's allow into a deny.
    if p.decide(Destination(host, port)).permits:
        assert channel.permits


@settings(deadline=None, max_examples=300)
@given(doc=_allowlists(), host=_HOSTS, port=st.sampled_from([443, 8443]))
def test_inspection_comes_from_a_rule_that_says_so(doc: str, host: str, port: int) -> None:
    p = policy(doc)
    rule = p.inspection(host, port)
    if rule is None:
        return
    assert rule.inspect and port in rule.allow_ports() and rule.host is not None
    assert rule.host == host or (rule.wildcard and host.endswith("." + rule.host))
    # Nothing more specific than the inspecting rule's pattern takes the port without it.
    if rule.wildcard:
        exact = [r for r in p.allow_rules if r.host == host and not r.wildcard]
        assert not any(port in r.allow_ports() for r in exact)
