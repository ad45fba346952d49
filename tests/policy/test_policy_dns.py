"""The DNS decision core (sidecar.policy.dns): queries, the rebinding filter, learned addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.dns import (
    InternalNames,
    LearnedAddresses,
    answer_denial,
    decide_query,
    filter_addresses,
    learned_stream,
    rule_name,
    still_learnable,
)
from sidecar.policy.engine import combine
from sidecar.policy.model import IPAddress, Mode, Reason, Verdict
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore, Snapshot

DOC = """\
allow:
  - api.stripe.com
  - "*.googleapis.com"
  - host: mydb.example.com
    ports: [5432]
  - cache.example.com:6379
  - web.example.com:443
  - cidr: 203.0.113.0/24
    ports: [5432]
  - host: inner.example.com
    ports: [5432]
deny:
  - upload.googleapis.com
  - host: mail.googleapis.com
    ports: [25]
privateRanges:
  - 10.20.0.0/16
"""

INTERNAL_REASON = Reason.CLUSTER_INTERNAL
INTERNAL = InternalNames.build(
    ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "corp.internal"],
    ["*.mesh.local", "legacy.example"],
)


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def snap(doc: str = DOC, mode: Mode | None = None) -> Snapshot:
    store = PolicyStore(mode)
    return store.set_policy(parse_allowlist(doc, source="test"))


@pytest.mark.parametrize(
    ("name", "qtype", "verdict", "reason", "rule"),
    [
        ("api.stripe.com", "A", Verdict.ALLOW, Reason.MATCHED_ALLOW, "api.stripe.com"),
        ("API.Stripe.com.", "AAAA", Verdict.ALLOW, Reason.MATCHED_ALLOW, "api.stripe.com"),
        ("storage.googleapis.com", "A", Verdict.ALLOW, Reason.MATCHED_ALLOW, "*.googleapis.com"),
        ("a.b.googleapis.com", "HTTPS", Verdict.ALLOW, Reason.MATCHED_ALLOW, "*.googleapis.com"),
        ("googleapis.com", "A", Verdict.DENY, Reason.NO_MATCH, None),  # the apex is not *.
        ("upload.googleapis.com", "A", Verdict.DENY, Reason.MATCHED_DENY, "upload.googleapis.com"),
        # A deny rule for some ports leaves the name resolvable: other ports may be allowed.
        ("mail.googleapis.com", "A", Verdict.ALLOW, Reason.MATCHED_ALLOW, "*.googleapis.com"),
        ("mydb.example.com", "A", Verdict.ALLOW, Reason.MATCHED_ALLOW, None),
        ("cache.example.com", "AAAA", Verdict.ALLOW, Reason.MATCHED_ALLOW, None),
        ("attacker.example", "A", Verdict.DENY, Reason.NO_MATCH, None),
        # TXT: decided by the name, like every type.
        ("api.stripe.com", "TXT", Verdict.ALLOW, Reason.MATCHED_ALLOW, "api.stripe.com"),
        ("c2VjcmV0.attacker.example", "TXT", Verdict.DENY, Reason.NO_MATCH, None),
        ("api.stripe.com", "NULL", Verdict.ALLOW, Reason.MATCHED_ALLOW, "api.stripe.com"),
        # SRV: the service labels name no host.
        ("_https._tcp.api.stripe.com", "SRV", Verdict.ALLOW, Reason.MATCHED_ALLOW, None),
        ("_https._tcp.api.stripe.com", "A", Verdict.DENY, Reason.NO_MATCH, None),
        # Zone transfers and ANY: never, even for an allowed name.
        ("api.stripe.com", "AXFR", Verdict.DENY, Reason.QUERY_TYPE, None),
        ("api.stripe.com", "ANY", Verdict.DENY, Reason.QUERY_TYPE, None),
        # A cidr rule allows addresses, not names; reverse zones are names like any other.
        ("db.somewhere.example", "A", Verdict.DENY, Reason.NO_MATCH, None),
        ("5.113.0.203.in-addr.arpa", "PTR", Verdict.DENY, Reason.NO_MATCH, None),
        # Internal: forwarded whatever the policy and the type.
        ("web.shop.svc.cluster.local", "A", Verdict.ALLOW, Reason.CLUSTER_INTERNAL, None),
        ("x.other.svc.cluster.local", "TXT", Verdict.ALLOW, Reason.CLUSTER_INTERNAL, None),
        (
            "api.stripe.com.shop.svc.cluster.local",
            "A",
            Verdict.ALLOW,
            Reason.CLUSTER_INTERNAL,
            None,
        ),
        ("db.corp.internal", "AXFR", Verdict.ALLOW, Reason.CLUSTER_INTERNAL, None),
        ("a.mesh.local", "A", Verdict.ALLOW, Reason.CLUSTER_INTERNAL, None),
        ("legacy.example", "A", Verdict.ALLOW, Reason.CLUSTER_INTERNAL, None),
        ("notlegacy.example", "A", Verdict.DENY, Reason.NO_MATCH, None),
        ("svc.cluster.local.attacker.example", "A", Verdict.DENY, Reason.NO_MATCH, None),
        # Names the policy cannot read are not forwarded.
        ("bad name.example", "A", Verdict.DENY, Reason.INVALID_DESTINATION, None),
        ("*.googleapis.com", "A", Verdict.DENY, Reason.INVALID_DESTINATION, None),
    ],
)
def test_query_decisions(
    name: str, qtype: str, verdict: Verdict, reason: Reason, rule: str | None
) -> None:
    decided = decide_query(snap(), name, qtype, INTERNAL)
    assert (decided.decision.verdict, decided.decision.reason) == (verdict, reason)
    if rule is not None:
        assert decided.decision.rule == rule
    assert decided.internal is (reason is Reason.CLUSTER_INTERNAL)


def test_audit_mode_forwards_and_records_audit() -> None:
    audit = snap(mode=Mode.AUDIT)
    decided = decide_query(audit, "c2VjcmV0.attacker.example", "TXT", INTERNAL)
    assert decided.decision.verdict is Verdict.AUDIT
    assert decided.decision.reason is Reason.NO_MATCH
    assert decide_query(audit, "api.stripe.com", "A", INTERNAL).decision.verdict is Verdict.ALLOW


def test_no_policy_denies_even_in_audit_but_internal_still_forwarded() -> None:
    store = PolicyStore(Mode.AUDIT)
    empty = store.get()
    decided = decide_query(empty, "api.stripe.com", "A", INTERNAL)
    assert (decided.decision.verdict, decided.decision.reason) == (
        Verdict.DENY,
        Reason.POLICY_NOT_LOADED,
    )
    assert decide_query(empty, "web.svc.cluster.local", "A", INTERNAL).decision.permits


def test_deleted_source_closes_its_names() -> None:
    a = parse_allowlist("allow: [a.test, both.test]", source="cm:a")
    b = parse_allowlist("allow: [b.test, both.test]", source="cm:b")
    store = PolicyStore()
    partial = store.set_partial(combine([a, b]), combine([a]), ["cm:b"])
    assert decide_query(partial, "a.test", "A", INTERNAL).decision.permits
    assert decide_query(partial, "both.test", "A", INTERNAL).decision.permits
    gone = decide_query(partial, "b.test", "A", INTERNAL).decision
    assert (gone.verdict, gone.reason) == (Verdict.DENY, Reason.POLICY_DELETED)


def test_rule_name_strips_service_labels_only_for_srv() -> None:
    assert rule_name("_ldap._tcp.corp.example", "SRV") == "corp.example"
    assert rule_name("_ldap._tcp.corp.example", "TXT") == "_ldap._tcp.corp.example"
    assert rule_name("_only", "SRV") == "_only"


# -- internal names: the suffix matcher against a brute-force reading -------------------------

# Letters first and last: a name ending in a numeric label is an IPv4 address to the policy.
_label = st.from_regex(r"[abcxyz]([abcxyz0-]{0,2}[abcxyz])?", fullmatch=True)
_name = st.lists(_label, min_size=1, max_size=5).map(".".join)


@settings(max_examples=300, deadline=None)
@given(domains=st.lists(_name, max_size=4), name=_name)
def test_internal_covers_exactly_equal_or_dot_suffix(domains: list[str], name: str) -> None:
    internal = InternalNames.build(domains)
    expected = any(name == d or name.endswith("." + d) for d in (*domains, "svc.cluster.local"))
    assert internal.covers(name) is expected


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(_name, min_size=1, max_size=4, unique=True), wild=st.booleans(), name=_name)
def test_name_decision_matches_brute_force(rules: list[str], wild: bool, name: str) -> None:
    """A name resolves iff an allow rule could match it: exact, or strictly under a ``*.``."""
    listed = [f'{{host: "*.{r}", broad: true}}' if wild else r for r in rules]
    policy = snap("allow: [" + ", ".join(listed) + "]")
    expected = any(name.endswith("." + r) if wild else name == r for r in rules)
    assert decide_query(policy, name, "A", InternalNames.build()).decision.permits is expected


# -- the rebinding filter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kept"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("169.254.169.254", False),  # metadata
        ("127.0.0.1", False),
        ("10.0.0.5", False),
        ("10.20.1.2", True),  # privateRanges
        ("203.0.113.9", True),  # a cidr allow rule covers it (it decides each call)
        ("::ffff:169.254.169.254", False),
        ("fd00:ec2::254", False),
        ("fe80::1", False),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of the metadata address
    ],
)
def test_rebinding_filter(address: str, kept: bool) -> None:
    filtered = filter_addresses(snap(), [ip(address)])
    assert (filtered.kept == (ip(address),)) is kept
    assert filtered.emptied is (not kept)


def test_filter_keeps_the_public_part_and_an_emptied_answer_is_denied() -> None:
    mixed = filter_addresses(snap(), [ip("169.254.169.254"), ip("8.8.4.4")])
    assert mixed.kept == (ip("8.8.4.4"),) and not mixed.emptied
    emptied = filter_addresses(snap(), [ip("169.254.169.254")])
    denial = answer_denial(emptied, "api.stripe.com")
    assert (denial.verdict, denial.reason) == (Verdict.DENY, Reason.PRIVATE_ADDRESS)
    assert "169.254.169.254 is cloud metadata" in (denial.detail or "")
    assert not filter_addresses(snap(), []).emptied


# -- learned addresses ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_learned_expire_with_their_ttl() -> None:
    clock = Clock()
    table = LearnedAddresses(clock=clock)
    table.learn("mydb.example.com", [ip("8.8.8.8"), ip("2001:4860::8888")], 30)
    assert table.names_for(ip("8.8.8.8")) == ("mydb.example.com",)
    assert set(table.addresses_for("mydb.example.com")) == {ip("8.8.8.8"), ip("2001:4860::8888")}
    clock.now += 29.9
    assert table.names_for(ip("2001:4860::8888")) == ("mydb.example.com",)
    clock.now += 0.2
    assert table.names_for(ip("8.8.8.8")) == ()
    assert table.expire() == 1  # the other one; the looked-up one went at the lookup
    assert len(table) == 0


def test_learned_ttl_is_clamped_and_renewed() -> None:
    clock = Clock()
    table = LearnedAddresses(min_ttl=10, max_ttl=60, clock=clock)
    table.learn("a.test", [ip("8.8.8.8")], 0)  # a TTL of 0 still lives min_ttl
    clock.now += 9
    assert table.names_for(ip("8.8.8.8")) == ("a.test",)
    table.learn("a.test", [ip("8.8.8.8")], 10**9)  # renewed, capped at max_ttl
    clock.now += 59
    assert table.names_for(ip("8.8.8.8")) == ("a.test",)
    clock.now += 2
    assert table.names_for(ip("8.8.8.8")) == ()
    zero = LearnedAddresses(clock=clock)
    zero.learn("a.test", [ip("8.8.8.8")], 0)
    assert len(zero) == 0


def test_learned_is_bounded_least_recently_learned_goes() -> None:
    table = LearnedAddresses(max_entries=3, clock=Clock())
    for n in range(3):
        table.learn(f"h{n}.test", [ip(f"8.8.8.{n}")], 60)
    table.learn("h0.test", [ip("8.8.8.0")], 60)  # renewed: now the most recent
    table.learn("h3.test", [ip("8.8.8.3")], 60)
    assert len(table) == 3
    assert table.names_for(ip("8.8.8.1")) == ()  # the oldest went
    assert table.names_for(ip("8.8.8.0")) == ("h0.test",)


def test_one_address_many_names() -> None:
    table = LearnedAddresses(clock=Clock())
    table.learn("a.test", [ip("8.8.8.8")], 60)
    table.learn("b.test", [ip("8.8.8.8")], 60)
    assert set(table.names_for(ip("8.8.8.8"))) == {"a.test", "b.test"}


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(0, 5), st.integers(0, 50)), max_size=60
    ),
    bound=st.integers(1, 6),
)
def test_learned_table_bound_and_index_hold(ops: list[tuple[str, int, int]], bound: int) -> None:
    clock = Clock()
    table = LearnedAddresses(max_entries=bound, clock=clock)
    for name, last, ttl in ops:
        table.learn(name, [ip(f"8.8.8.{last}")], ttl)
        clock.now += 1
        assert len(table) <= bound
    for last in range(6):
        for name in table.names_for(ip(f"8.8.8.{last}")):
            assert ip(f"8.8.8.{last}") in table.addresses_for(name)


def test_recheck_on_reload_drops_what_the_new_policy_refuses() -> None:
    table = LearnedAddresses(clock=Clock())
    table.learn("mydb.example.com", [ip("8.8.8.8")], 60)
    table.learn("api.stripe.com", [ip("8.8.4.4")], 60)
    table.learn("storage.googleapis.com", [ip("10.20.0.7")], 60)
    new = snap("allow: [api.stripe.com, '*.googleapis.com']")  # no mydb, no privateRanges
    assert table.recheck(lambda n, a: still_learnable(new, n, a)) == 2
    assert table.names_for(ip("8.8.4.4")) == ("api.stripe.com",)
    assert table.names_for(ip("8.8.8.8")) == ()
    assert table.names_for(ip("10.20.0.7")) == ()


# -- raw TCP to a learned address -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "address", "port", "granted"),
    [
        ("mydb.example.com", "8.8.8.8", 5432, True),
        ("mydb.example.com", "8.8.8.8", 5433, False),  # not a port of its rule
        ("cache.example.com", "8.8.8.8", 6379, True),  # host:port form is explicit too
        ("api.stripe.com", "8.8.8.8", 443, False),  # 80/443 carry their own name
        ("web.example.com", "8.8.8.8", 443, False),  # even listed explicitly
        ("storage.googleapis.com", "8.8.8.8", 5432, False),  # default ports only
        ("mydb.example.com", "169.254.169.254", 5432, False),  # the guard still applies
        ("inner.example.com", "10.20.3.3", 5432, True),  # privateRanges
    ],
)
def test_learned_stream(name: str, address: str, port: int, granted: bool) -> None:
    table = LearnedAddresses(clock=Clock())
    table.learn(name, [ip(address)], 60)
    got = learned_stream(snap(), table, ip(address), port)
    assert (got is not None) is granted
    if got is not None:
        decision, host = got
        assert host == name
        assert (decision.verdict, decision.reason) == (Verdict.ALLOW, Reason.MATCHED_ALLOW)


def test_learned_stream_expired_or_unknown_falls_back() -> None:
    clock = Clock()
    table = LearnedAddresses(clock=clock)
    table.learn("mydb.example.com", [ip("8.8.8.8")], 5)
    assert learned_stream(snap(), table, ip("8.8.8.8"), 5432) is not None
    clock.now += 6
    assert learned_stream(snap(), table, ip("8.8.8.8"), 5432) is None
    assert learned_stream(snap(), table, ip("8.8.4.4"), 5432) is None
    assert learned_stream(snap(), None, ip("8.8.4.4"), 5432) is None


def test_learned_stream_deny_rule_wins() -> None:
    doc = "allow: [{host: mydb.example.com, ports: [5432]}]\ndeny: [mydb.example.com]"
    table = LearnedAddresses(clock=Clock())
    table.learn("mydb.example.com", [ip("8.8.8.8")], 60)
    assert learned_stream(snap(doc), table, ip("8.8.8.8"), 5432) is None


def test_learned_stream_uses_the_current_policy() -> None:
    table = LearnedAddresses(clock=Clock())
    table.learn("mydb.example.com", [ip("8.8.8.8")], 60)
    assert learned_stream(snap(), table, ip("8.8.8.8"), 5432) is not None
    assert learned_stream(snap("allow: [other.test]"), table, ip("8.8.8.8"), 5432) is None
    assert learned_stream(Snapshot(None), table, ip("8.8.8.8"), 5432) is None
