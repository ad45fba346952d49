"""The pure part of `kubectl egress` (sidecar.kubectl.plan), table-driven."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from sidecar.destinations import SeenDestination
from sidecar.kubectl import plan
from sidecar.kubectl.plan import UsageError, WorkloadRef
from sidecar.policy.model import Mode
from sidecar.policy.parse import parse_allowlist

T1, T2, T3 = "2026-12-02T10:00:00Z", "2026-12-02T11:00:00Z", "2026-12-02T12:00:00Z"


def seen(host: str, port: int = 443, **kw: Any) -> SeenDestination:
    fields: dict[str, Any] = {
        "capture": "explicit",
        "protocol": "CONNECT",
        "decision": "audit",
        "reason": "no allow rule matches",
        "rule": None,
        "count": 1,
        "first_seen": T1,
        "last_seen": T2,
        "address": "93.184.215.14",
    }
    fields.update(kw)
    return SeenDestination(host=host, port=port, **fields)


# -- workloads ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("deploy/web", "Deployment", "web"),
        ("deployment/web", "Deployment", "web"),
        ("deployments.apps/web", "Deployment", "web"),
        ("Deploy/web", "Deployment", "web"),
        ("sts/db", "StatefulSet", "db"),
        ("statefulset/db", "StatefulSet", "db"),
        ("ds/agent", "DaemonSet", "agent"),
    ],
)
def test_workload_refs(text: str, kind: str, name: str) -> None:
    ref = WorkloadRef.parse(text)
    assert (ref.kind.kind, ref.name) == (kind, name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("web", "is not KIND/NAME"),
        ("deploy/", "is not KIND/NAME"),
        ("deploy/a/b", "is not KIND/NAME"),
        ("pod/web-1", "'pod' is not a workload kind"),
        ("cronjob/x", "'cronjob' is not a workload kind"),
    ],
)
def test_bad_workload_refs(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        WorkloadRef.parse(text)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"matchLabels": {"app": "web"}}, "app=web"),
        ({"matchLabels": {"tier": "f", "app": "web"}}, "app=web,tier=f"),
        (
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [
                    {"key": "track", "operator": "In", "values": ["a", "b"]},
                    {"key": "env", "operator": "NotIn", "values": ["dev"]},
                    {"key": "ready", "operator": "Exists"},
                    {"key": "old", "operator": "DoesNotExist"},
                ],
            },
            "app=web,track in (a,b),env notin (dev),ready,!old",
        ),
    ],
)
def test_label_selectors(selector: dict[str, Any], expected: str) -> None:
    assert plan.label_selector(selector) == expected


def test_an_empty_selector_is_refused() -> None:
    with pytest.raises(ValueError, match="empty selector"):
        plan.label_selector({})


# -- merging what pods saw ----------------------------------------------------------------------


def test_merge_adds_counts_and_keeps_the_widest_window() -> None:
    a = seen("api.test", count=2, first_seen=T2, last_seen=T2, address="93.184.215.1")
    b = seen("api.test", count=3, first_seen=T1, last_seen=T3, address="93.184.215.2")
    other = seen("api.test", decision="deny")
    merged = plan.merge_seen([[a, other], [b]])
    assert len(merged) == 2
    [m] = [s for s in merged if s.decision == "audit"]
    assert (m.count, m.first_seen, m.last_seen, m.address) == (5, T1, T3, "93.184.215.2")


def test_merge_fills_the_address_of_a_call_denied_by_name() -> None:
    by_name = seen("db.internal", 5432, decision="deny", address=None, last_seen=T3)
    resolved = seen("db.internal", 5432, reason="private address", address="10.1.2.3")
    merged = plan.merge_seen([[by_name], [resolved]])
    assert {s.address for s in merged} == {"10.1.2.3"}
    s = plan.suggest(None, None, merged)
    assert s.added == []  # private: left out, whichever entry is looked at
    assert [p.text for p in s.proposals] == ["{cidr: 10.1.2.3/32, ports: [5432]}"]


# -- suggest ------------------------------------------------------------------------------------

CURRENT = """\
mode: audit
allow:
  - api.stripe.com
  - "*.googleapis.com"
  - host: httpbin.org
    ports: [80, 443]
    methods: [GET]
deny:
  - upload.googleapis.com
privateRanges:
  - 10.20.0.0/16
"""


@pytest.mark.parametrize(
    ("destinations", "added", "left_out"),
    [
        # Already allowed when seen, or by the current document: nothing to add.
        ([seen("api.stripe.com", decision="allow", rule="api.stripe.com")], [], []),
        ([seen("storage.googleapis.com")], [], []),
        # The narrowest rule for the ports seen.
        ([seen("api.github.com")], ["api.github.com:443"], []),
        ([seen("api.github.com"), seen("api.github.com", 80)], ["api.github.com"], []),
        (
            [seen("api.github.com"), seen("api.github.com", 8443)],
            ["{host: api.github.com, ports: [443, 8443]}"],
            [],
        ),
        # Case and a trailing dot do not make two rules.
        ([seen("API.github.com."), seen("api.github.com")], ["api.github.com:443"], []),
        # An address literal, public: a /32 cidr rule.
        (
            [seen("93.184.215.7", 5432, protocol="TCP")],
            ["{cidr: 93.184.215.7/32, ports: [5432]}"],
            [],
        ),
        # Private: left out (commented) by default ...
        (
            [seen("db.internal", 5432, reason="private address", address="10.1.2.3")],
            [],
            ["{cidr: 10.1.2.3/32, ports: [5432]}"],
        ),
        (
            [seen("10.9.9.9", 80, protocol="GET", address="10.9.9.9")],
            [],
            ["{cidr: 10.9.9.9/32, ports: [80]}"],
        ),
        # ... but an address inside privateRanges is a host rule's business.
        ([seen("cache.internal", 6379, address="10.20.1.1")], ["cache.internal:6379"], []),
    ],
)
def test_what_suggest_proposes(
    destinations: list[SeenDestination], added: list[str], left_out: list[str]
) -> None:
    current = parse_allowlist(CURRENT, source="test")
    s = plan.suggest(CURRENT, current, destinations)
    assert [p.text for p in s.added] == added
    assert [p.text for p in s.proposals if not p.added] == left_out
    proposed = parse_allowlist(s.document, source="proposed")
    for d in destinations:
        allowed = proposed.decide(plan.destination_of(d)).permits
        assert allowed == (d.address != "10.1.2.3" and d.host != "10.9.9.9")
    if left_out:
        assert any("private address" in w for w in s.warnings)


def test_private_destinations_are_added_with_a_warning_when_asked() -> None:
    d = seen("db.internal", 5432, reason="private address", address="10.1.2.3")
    s = plan.suggest(CURRENT, parse_allowlist(CURRENT, source="t"), [d], include_private=True)
    assert [p.text for p in s.added] == ["{cidr: 10.1.2.3/32, ports: [5432]}", "db.internal:5432"]
    assert s.warnings == [
        "db.internal is a private address (10.1.2.3/32): added as a cidr rule (--private); it "
        "lifts the private-address guard there"
    ]
    assert "# PRIVATE address: 1 call to db.internal" in s.document
    assert parse_allowlist(s.document, source="p").decide(plan.destination_of(d)).permits


def test_a_deny_rule_is_never_argued_with() -> None:
    s = plan.suggest(CURRENT, parse_allowlist(CURRENT, source="t"), [seen("upload.googleapis.com")])
    assert s.added == []
    assert [k.destination for k in s.skipped] == ["upload.googleapis.com:443"]
    assert "deny rule" in s.skipped[0].reason


SUBDOMAINS = [seen(f"{h}.cdn.example.com", count=2) for h in ("img", "js", "css")] + [
    seen("example.com")
]


@pytest.mark.parametrize(
    ("wildcards", "minimum", "added", "hint"),
    [
        (
            False,
            3,
            [
                "css.cdn.example.com:443",
                "example.com:443",
                "img.cdn.example.com:443",
                "js.cdn.example.com:443",
            ],
            True,
        ),
        (True, 3, ["'*.example.com'", "example.com:443"], False),
        (
            True,
            4,
            [
                "css.cdn.example.com:443",
                "example.com:443",
                "img.cdn.example.com:443",
                "js.cdn.example.com:443",
            ],
            False,
        ),
    ],
)
def test_wildcards_only_when_asked(
    wildcards: bool, minimum: int, added: list[str], hint: bool
) -> None:
    s = plan.suggest(None, None, SUBDOMAINS, wildcards=wildcards, wildcard_min=minimum)
    assert sorted(p.text for p in s.added) == sorted(
        a.replace("'*.example.com'", "{host: '*.example.com', ports: [443]}") for a in added
    )
    assert any("--wildcards would propose" in w for w in s.warnings) == hint
    proposed = parse_allowlist(s.document, source="p")
    assert all(proposed.decide(plan.destination_of(d)).permits for d in SUBDOMAINS)


def test_registrable_domains() -> None:
    assert plan.registrable_domain("a.b.example.co.uk") == "example.co.uk"
    assert plan.registrable_domain("x.user.github.io") == "user.github.io"
    assert plan.registrable_domain("img.cdn.test") == "cdn.test"


def test_the_merged_document_keeps_every_current_rule_and_comments_the_new() -> None:
    s = plan.suggest(
        CURRENT,
        parse_allowlist(CURRENT, source="t"),
        [seen("api.github.com", count=12, last_seen=T3)],
    )
    assert s.document == (
        "mode: audit\n"
        "allow:\n"
        "  - api.stripe.com\n"
        "  - '*.googleapis.com'\n"
        "  - {host: httpbin.org, ports: [80, 443], methods: [GET]}\n"
        "  # proposed by kubectl egress suggest, from what the pods called:\n"
        "  - api.github.com:443  # 12 calls, last seen 2026-12-02T12:00:00Z\n"
        "deny:\n"
        "  - upload.googleapis.com\n"
        "privateRanges:\n"
        "  - 10.20.0.0/16\n"
    )
    old = parse_allowlist(CURRENT, source="t")
    new = parse_allowlist(s.document, source="t")
    assert [r.text for r in new.allow_rules][:3] == [r.text for r in old.allow_rules]


def test_a_first_allowlist_from_nothing() -> None:
    s = plan.suggest(None, None, [seen("api.github.com")])
    assert s.document.startswith("allow:\n  # proposed")
    manifest = yaml.safe_load(plan.configmap_manifest("egress-allowlist", "shop", s.document))
    assert manifest["data"]["allowlist.yaml"] == s.document
    assert manifest["metadata"] == {"name": "egress-allowlist", "namespace": "shop"}


# -- diff ---------------------------------------------------------------------------------------

NEW = """\
allow:
  - api.stripe.com:443
  - api.github.com
  - host: web.example
    ports: [80]
    paths: ["/v1/*"]
"""


@pytest.mark.parametrize(
    ("destination", "kind"),
    [
        (seen("api.stripe.com", decision="allow", rule="api.stripe.com"), plan.RULE_CHANGED),
        (seen("api.stripe.com", 80, decision="allow", rule="api.stripe.com"), plan.ALLOW_TO_DENY),
        (seen("api.github.com"), plan.AUDIT_TO_ALLOW),
        (seen("api.github.com", decision="deny"), plan.DENY_TO_ALLOW),
        (seen("api.github.com", decision="allow", rule="api.github.com"), plan.UNCHANGED),
        (seen("other.example"), plan.AUDIT_TO_DENY),
        (seen("other.example", decision="deny"), plan.UNCHANGED),
        # Plain HTTP under a rule with paths: the path is not kept, so it is not guessed.
        (seen("web.example", 80, protocol="GET"), plan.DEPENDS_ON_PATH),
        (
            seen(
                "web.example",
                80,
                protocol="GET",
                decision="allow",
                rule='{host: web.example, ports: [80], paths: ["/v1/*"]}',
            ),
            plan.DEPENDS_ON_PATH,
        ),
        # Through a tunnel the paths are not visible: a real deny.
        (seen("web.example", 80, decision="allow", rule="web.example"), plan.ALLOW_TO_DENY),
        # The guard: a private address stays denied unless the pod's ranges cover it.
        (
            seen("api.github.com", decision="deny", reason="private address", address="10.0.0.5"),
            plan.UNCHANGED,
        ),
    ],
)
def test_diff_classification(destination: SeenDestination, kind: str) -> None:
    assert plan.classify(destination, parse_allowlist(NEW, source="new")).kind == kind


def test_the_new_documents_mode_counts() -> None:
    new = parse_allowlist(NEW, source="new")
    d = seen("other.example")
    assert plan.classify(d, new, Mode.AUDIT).kind == plan.UNCHANGED
    assert plan.classify(d, new, Mode.ENFORCE).kind == plan.AUDIT_TO_DENY
    allowed = seen("api.stripe.com", 80, decision="allow", rule="api.stripe.com")
    assert plan.classify(allowed, new, Mode.AUDIT).kind == "allow→audit"


def test_the_pods_own_private_ranges_count() -> None:
    d = seen("api.github.com", decision="deny", reason="private address", address="10.0.0.5")
    new = parse_allowlist(NEW, source="new")
    assert plan.diff([d], new)[0].kind == plan.UNCHANGED
    assert plan.diff([d], new, [ipaddress.ip_network("10.0.0.0/8")])[0].kind == plan.DENY_TO_ALLOW


def test_an_unchanged_path_rule_is_unchanged() -> None:
    doc = 'allow:\n  - host: web.example\n    ports: [80]\n    paths: ["/v1/*"]\n'
    rule = parse_allowlist(doc, source="x").allow_rules[0].text
    d = seen("web.example", 80, protocol="GET", decision="allow", rule=rule)
    assert plan.classify(d, parse_allowlist(doc, source="x")).kind == plan.UNCHANGED


def test_diff_orders_breaking_changes_first_then_by_calls() -> None:
    new = parse_allowlist(NEW, source="new")
    changes = plan.diff(
        [
            seen("api.github.com", count=50),
            seen("a.example", decision="allow", rule="a.example", count=1),
            seen("b.example", decision="allow", rule="b.example", count=9),
            seen("zzz.example", decision="deny"),
            seen("yyy.example"),
        ],
        new,
    )
    assert [(c.kind, c.seen.host) for c in changes] == [
        (plan.ALLOW_TO_DENY, "b.example"),
        (plan.ALLOW_TO_DENY, "a.example"),
        (plan.AUDIT_TO_DENY, "yyy.example"),
        (plan.AUDIT_TO_ALLOW, "api.github.com"),
        (plan.UNCHANGED, "zzz.example"),
    ]


# -- tables -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "rows", "colors", "expected"),
    [
        (["A", "BB"], [], [], "A   BB\n"),
        (
            ["NAME", "X"],
            [["web", "1"], ["a-longer-name", ""]],
            [],
            "NAME            X\nweb             1\na-longer-name\n",
        ),
        (
            ["K", "V"],
            [["allow→deny", "x"], ["same", "y"]],
            [plan.RED, None],
            "K            V\n\x1b[31mallow→deny   x\x1b[0m\nsame         y\n",
        ),
    ],
)
def test_tables(
    headers: list[str], rows: list[list[str]], colors: list[str | None], expected: str
) -> None:
    assert plan.render_table(headers, rows, colors) == expected


def test_diff_table_is_red_only_where_asked() -> None:
    changes = plan.diff(
        [seen("b.example", decision="allow", rule="b.example")], parse_allowlist(NEW, source="n")
    )
    assert plan.RED in plan.diff_table(changes, color=True)
    assert "\x1b" not in plan.diff_table(changes, color=False)


RICH = """\
allow:
  - host: web.example
    ports: [80]
    paths: ["/v1/*", '/status']
    methods: [GET, HEAD]
  - cidr: 203.0.113.0/24
    ports: [5432]
  - "bücher.example"
  - host: "*.svc.example"
    ports: [8443]
  - api.example.com:8080
deny:
  - cidr: 10.0.0.0/8
privateRanges: [10.20.0.0/16]
"""


def test_every_rule_shape_survives_the_merge_as_written() -> None:
    old = parse_allowlist(RICH, source="old")
    s = plan.suggest(RICH, old, [seen("api.github.com")])
    assert '  - "bücher.example"' not in s.document and "  - bücher.example" in s.document
    new = parse_allowlist(s.document, source="new")
    assert [r.text for r in new.allow_rules][:-1] == [r.text for r in old.allow_rules]
    assert [r.text for r in new.deny_rules] == [r.text for r in old.deny_rules]
    assert new.private_ranges == old.private_ranges


# -- DNS query decisions (the DNS listener reports them: protocol DNS, port 53) -----------------


def dns(host: str, **kw: Any) -> SeenDestination:
    return seen(host, 53, capture="transparent", protocol="DNS", address=None, **kw)


def test_a_query_followed_by_a_connection_needs_only_the_connections_rule() -> None:
    s = plan.suggest(None, None, [dns("api.github.com"), seen("api.github.com")])
    assert [p.text for p in s.added] == ["api.github.com:443"]
    assert s.skipped == []
    proposed = parse_allowlist(s.document, source="p")
    assert plan.decide_query_name(dns("api.github.com"), proposed).permits


def test_a_denied_query_alone_is_said_not_guessed() -> None:
    s = plan.suggest(
        CURRENT,
        parse_allowlist(CURRENT, source="t"),
        [
            dns("unknown.example", decision="deny"),
            dns("api.stripe.com", decision="deny"),  # allowed by now: nothing to say
            dns(
                "kubernetes.default.svc.cluster.local",
                decision="allow",
                reason="cluster-internal name",
            ),
            dns("zone.example", decision="deny", reason="query type not allowed"),
        ],
    )
    assert s.added == []
    assert [k.destination for k in s.skipped] == ["unknown.example (DNS)"]
    assert "port is unknown" in s.skipped[0].reason


@pytest.mark.parametrize(
    ("destination", "kind"),
    [
        (dns("api.github.com", decision="deny"), plan.DENY_TO_ALLOW),
        (dns("_ldap._tcp.api.github.com", decision="deny"), plan.DENY_TO_ALLOW),
        (dns("api.stripe.com", decision="allow", rule="api.stripe.com"), plan.RULE_CHANGED),
        (dns("gone.example", decision="allow", rule="gone.example"), plan.ALLOW_TO_DENY),
        (
            dns("x.svc.cluster.local", decision="allow", reason="cluster-internal name"),
            plan.UNCHANGED,
        ),
        (dns("x.example", decision="deny", reason="query type not allowed"), plan.UNCHANGED),
    ],
)
def test_diff_decides_queries_by_name(destination: SeenDestination, kind: str) -> None:
    assert plan.classify(destination, parse_allowlist(NEW, source="new")).kind == kind


def test_private_named_hosts_get_a_host_rule_too_when_added() -> None:
    d = seen("db.internal", 5432, reason="private address", address="10.1.2.3")
    s = plan.suggest(None, None, [d], include_private=True)
    assert [p.text for p in s.added] == ["{cidr: 10.1.2.3/32, ports: [5432]}", "db.internal:5432"]
    proposed = parse_allowlist(s.document, source="p")
    assert proposed.decide(plan.destination_of(d)).permits
    assert plan.decide_query_name(dns("db.internal"), proposed).permits
    left_out = plan.suggest(None, None, [d])
    assert left_out.added == [] and len(left_out.proposals) == 1
