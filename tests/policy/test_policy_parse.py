"""parse_allowlist: accepted forms, every rejected form with its message and line, fuzzing."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.policy.engine import Policy
from sidecar.policy.errors import AllowlistError, Problem
from sidecar.policy.model import Destination, Mode, Reason, Verdict
from sidecar.policy.parse import digest, parse_allowlist, validate_text

MANIFEST_HEAD = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: egress-allowlist
data:
  allowlist.yaml: |
"""
MANIFEST_OFFSET = 6  # document line 1 is line 7 of the manifest


def manifest(doc: str, indent: int = 4) -> str:
    return MANIFEST_HEAD + textwrap.indent(doc, " " * indent, lambda line: True)


def problems(text: str) -> list[Problem]:
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(text, source="src.yaml")
    assert caught.value.problems
    assert caught.value.source == "src.yaml"
    return list(caught.value.problems)


def allows(policy: Policy, host: str | None, port: int, address: str | None = None) -> bool:
    dest = Destination(host, port, ipaddress.ip_address(address) if address else None)
    return policy.decide(dest).verdict is Verdict.ALLOW


# -- accepted -------------------------------------------------------------------------------


def test_string_rule_forms() -> None:
    policy = parse_allowlist(
        textwrap.dedent(
            """\
            allow:
              - api.example.com
              - api.example.org:8443
              - "*.example.net"
              - "*.example.io:9000"
              - 8.8.8.8
              - 1.1.1.0/24
              - "[2001:4860:4860::8888]:53"
              - 2606:4700::/32
              - 9.9.9.9:853
              - host: 4.4.4.4
              - host: bücher.example
                ports: 8080
                methods: get
                paths: /v1/*
            """
        ),
        source="s",
    )
    assert policy.rule_count == 11
    assert allows(policy, "api.example.com", 443) and allows(policy, "api.example.com", 80)
    assert not allows(policy, "api.example.com", 8443)
    assert allows(policy, "api.example.org", 8443) and not allows(policy, "api.example.org", 443)
    assert allows(policy, "a.example.net", 443) and not allows(policy, "example.net", 443)
    assert allows(policy, "a.b.example.io", 9000) and not allows(policy, "a.example.io", 443)
    assert allows(policy, "8.8.8.8", 443) and allows(policy, None, 80, "8.8.8.8")
    assert not allows(policy, "8.8.8.8", 53)
    assert allows(policy, None, 443, "1.1.1.200")
    assert allows(policy, "2001:4860:4860::8888", 53)
    assert allows(policy, None, 443, "2606:4700::1111")
    assert allows(policy, "9.9.9.9", 853) and not allows(policy, "9.9.9.9", 443)
    assert allows(policy, "4.4.4.4", 443)
    rules = {r.text: r for r in policy.allow_rules}
    ip_rule = rules["8.8.8.8"]
    assert ip_rule.network == ipaddress.ip_network("8.8.8.8/32") and ip_rule.host is None
    mapped = rules["{host: bücher.example, ports: 8080, methods: get, paths: /v1/*}"]
    assert mapped.host == "xn--bcher-kva.example"
    assert mapped.ports == frozenset({8080}) and mapped.methods == frozenset({"GET"})
    assert mapped.line == 12
    assert rules["api.example.com"].line == 2


def test_rule_text_is_as_written() -> None:
    policy = parse_allowlist(
        textwrap.dedent(
            """\
            allow:
              - API.Example.COM.
              - host: httpbin.org
                ports: [80, 443]
                methods: [GET, HEAD]
                paths: ["/get", "/status/*"]
            """
        ),
        source="s",
    )
    texts = [r.text for r in policy.allow_rules]
    assert texts == [
        "API.Example.COM.",
        "{host: httpbin.org, ports: [80, 443], methods: [GET, HEAD], paths: [/get, /status/*]}",
    ]
    decision = policy.decide(Destination("api.example.com", 443))
    assert decision.rule == "API.Example.COM."


def test_meta_mode_and_version() -> None:
    doc = "mode: audit\nallow: [a.test]\n"
    bare = parse_allowlist(doc, source="file:/x.yaml")
    assert bare.meta.source == "file:/x.yaml"
    assert bare.meta.mode is Mode.AUDIT
    assert bare.meta.version == digest(doc)
    assert bare.meta.version.startswith("sha256:") and len(bare.meta.version) == 7 + 12
    # the version is the digest of the allowlist document, however it is wrapped
    wrapped = parse_allowlist(manifest(doc), source="file:/cm.yaml")
    assert wrapped.meta.version == bare.meta.version
    assert parse_allowlist(doc, source="s", version="12345").meta.version == "12345"
    assert parse_allowlist("allow: [a.test]", source="s").meta.mode is None
    assert parse_allowlist("mode: enforce\nallow: []", source="s").meta.mode is Mode.ENFORCE
    assert digest(doc) != digest(doc + " ")


@pytest.mark.parametrize(
    "doc",
    [
        "allow: []",
        "allow:\n",  # every entry commented out
        "allow:\n#  - a.test\ndeny:\n",
        "deny: [a.test]",
        "privateRanges: [10.0.0.0/8, 'fd00::/8', 192.168.1.1]",
        "mode: audit",
    ],
)
def test_minimal_documents_are_valid(doc: str) -> None:
    assert validate_text(doc, source="s") == []
    policy = parse_allowlist(doc, source="s")
    assert policy.decide(Destination("a.test", 443)).verdict is Verdict.DENY


def test_manifest_with_other_keys_and_crlf() -> None:
    text = manifest("allow:\n  - a.test\n").replace("\n", "\r\n")
    text += "  other.yaml: |\r\n    x: 1\r\n"
    policy = parse_allowlist(text, source="cm")
    assert allows(policy, "a.test", 443)


def test_example_manifest_file() -> None:
    text = (Path(__file__).parents[2] / "examples" / "allowlist.yaml").read_text("utf-8")
    policy = parse_allowlist(text, source="file:examples/allowlist.yaml")
    assert yaml.safe_load(text)["metadata"]["name"] == "egress-allowlist"
    assert policy.meta.mode is Mode.ENFORCE
    assert allows(policy, "api.github.com", 443)
    evil = policy.decide(Destination("evil.example", 443))
    assert (evil.verdict, evil.reason) == (Verdict.DENY, Reason.NO_MATCH)
    assert allows(policy, "storage.googleapis.com", 443)
    assert policy.decide(Destination("upload.googleapis.com", 443)).reason is Reason.MATCHED_DENY
    assert allows(policy, None, 5432, "203.0.113.10")
    assert policy.private_ranges == (ipaddress.ip_network("10.20.0.0/16"),)


# -- rejected: message and line, bare and inside a ConfigMap manifest ---------------------------

REJECTED: list[tuple[str, int, str]] = [
    ('allow:\n  - "*"\n', 2, '"*" is not a valid host pattern: only a leading "*." wildcard'),
    ('allow:\n  - "*."\n', 2, '"*." is not a valid host pattern'),
    ("allow:\n  - a*.b.com\n", 2, '"a*.b.com" is not a valid host pattern'),
    ('allow:\n  - "*.*.com"\n', 2, '"*.*.com" is not a valid host pattern'),
    ("allow:\n  - foo.*.com\n", 2, '"foo.*.com" is not a valid host pattern'),
    ("allow:\n  - '*com'\n", 2, '"*com" is not a valid host pattern'),
    ("allow:\n  - host: '*'\n", 2, '"*" is not a valid host pattern'),
    ("allow:\n  - ''\n", 2, "empty rule"),
    ("allow:\n  -\n", 2, "empty allow rule"),
    ("allow:\n  - host: ''\n", 2, "empty host"),
    ("allow:\n  - a..b.com\n", 2, '"a..b.com" is not a valid host: empty label'),
    ("allow:\n  - exa mple.com\n", 2, "character ' ' is not allowed"),
    ("allow:\n  - '*.10.0.0.1'\n", 2, "a wildcard cannot apply to an IP address"),
    ("allow:\n  - https://api.github.com/zen\n", 2, "looks like a URL"),
    ("allow:\n  - a.com:0\n", 2, "port 0 is out of range"),
    ("allow:\n  - a.com:99999\n", 2, "port 99999 is out of range 1..65535"),
    ("allow:\n  - a.com:123456\n", 2, "is not a number from 1 to 65535"),
    ("allow:\n  - a.com:https\n", 2, "port 'https' is not a number"),
    ("allow:\n  - 10.0.0.0/8:5432\n", 2, "needs the mapping form"),
    ("allow:\n  - 10.0.0.1/8\n", 2, '"10.0.0.1/8" has host bits set: did you mean 10.0.0.0/8?'),
    ("allow:\n  - cidr: fd00::1/8\n", 2, "did you mean fd00::/8?"),
    ("allow:\n  - cidr: 10.0.0.0/33\n", 2, '"10.0.0.0/33" is not a valid CIDR'),
    ("allow:\n  - cidr: example.com\n", 2, '"example.com" is not a valid CIDR'),
    ("allow:\n  - 'fe80::1%eth0'\n", 2, "zone ids (%...) are not supported"),
    ("privateRanges:\n  - 'fe80::%eth0/64'\n", 2, "zone ids (%...) are not supported"),
    ("allow:\n  - 443\n", 2, "an allow rule must be a string, not number 443 (quote it)"),
    ("allow:\n  - yes\n", 2, "must be a string, not boolean yes"),
    ("allow:\n  - [a.com]\n", 2, "an allow rule must be a host, host:port, CIDR or a mapping"),
    (
        "allow:\n  - host: a.com\n    port: 80\n",
        3,
        'unknown rule key "port" (did you mean "ports"?)',
    ),
    ("allow:\n  - host: a.com\n    cidr: 1.2.3.0/24\n", 2, 'exactly one of "host" or "cidr" (both'),
    ("allow:\n  - ports: [80]\n", 2, 'exactly one of "host" or "cidr" (neither given)'),
    ("allow:\n  - host: a.com:443\n", 2, 'host "a.com:443" carries a port: put it in ports: [443]'),
    ("allow:\n  - host: [a.com]\n", 2, "host must be a string, not a list"),
    ("allow:\n  - host: a.com\n    ports: []\n", 3, "ports: [] allows no port"),
    ("allow:\n  - host: a.com\n    ports: [0]\n", 3, "port 0 must be a decimal number"),
    ("allow:\n  - host: a.com\n    ports: [65536]\n", 3, "port 65536 is out of range"),
    ("allow:\n  - host: a.com\n    ports: [-1]\n", 3, "port -1 must be a decimal number"),
    ("allow:\n  - host: a.com\n    ports: [0443]\n", 3, "port 0443 must be a decimal number"),
    ("allow:\n  - host: a.com\n    ports: [0x50]\n", 3, "port 0x50 must be a decimal number"),
    (
        "allow:\n  - host: a.com\n    ports: ['443']\n",
        3,
        'a port must be a number from 1 to 65535, not "443"',
    ),
    ("allow:\n  - host: a.com\n    ports: [true]\n", 3, "not boolean true"),
    ("allow:\n  - host: a.com\n    ports: [80.5]\n", 3, "not number 80.5"),
    ("allow:\n  - host: a.com\n    ports: [8000-8100]\n", 3, 'not "8000-8100"'),
    ("allow:\n  - host: a.com\n    ports:\n      - 80\n      - 80\n", 5, "port 80 is listed twice"),
    ("allow:\n  - host: a.com\n    ports: {a: 1}\n", 3, "ports must be a list, not a mapping"),
    ("allow:\n  - host: a.com\n    methods: [GET, 'GE T']\n", 3, '"GE T" is not an HTTP method'),
    ("allow:\n  - host: a.com\n    methods: [get, GET]\n", 3, "method GET is listed twice"),
    ("allow:\n  - host: a.com\n    methods: []\n", 3, "methods: [] allows no method"),
    ("allow:\n  - host: a.com\n    methods: [1]\n", 3, "a method must be a string, not number 1"),
    ("allow:\n  - host: a.com\n    paths: [get]\n", 3, 'path "get" must start with "/"'),
    ("allow:\n  - host: a.com\n    paths: ['/a?b=1']\n", 3, "without the query string"),
    ("allow:\n  - host: a.com\n    paths: ['/a b']\n", 3, "spaces and control characters"),
    ("allow:\n  - host: a.com\n    paths: []\n", 3, "paths: [] allows no path"),
    ("allow:\n  - host: a.com\n    paths: [/a, /a]\n", 3, 'path "/a" is listed twice'),
    (
        "allow:\n  - a.com\n  - A.COM.\n",
        3,
        'duplicate allow rule "A.COM.": same as "a.com" on line 2',
    ),
    ("deny:\n  - '*.a.com'\n  - '*.A.com'\n", 3, "duplicate deny rule"),
    ("allow:\n  - 8.8.8.8\n  - cidr: 8.8.8.8/32\n", 3, 'same as "8.8.8.8" on line 2'),
    (
        "allow:\n  - host: a.com\n    host: b.com\n",
        3,
        '"host" appears twice in a rule (first on line 2)',
    ),
    ("allow: [a.com]\nallow: [b.com]\n", 2, '"allow" appears twice in the allowlist'),
    ("alow:\n  - a.com\n", 1, 'unknown key "alow" (did you mean "allow"?)'),
    (
        "allow: []\nprivateRange: []\n",
        2,
        'unknown key "privateRange" (did you mean "privateRanges"?)',
    ),
    ("allow: a.com\n", 1, 'allow must be a list, not "a.com"'),
    ("deny: {a: 1}\n", 1, "deny must be a list, not a mapping"),
    ("mode: block\n", 1, 'mode must be "enforce" or "audit", not "block"'),
    ("mode: on\n", 1, 'mode must be "enforce" or "audit", not boolean on'),
    ("mode:\n", 1, "not nothing (null)"),
    ("privateRanges:\n  - 10.0.0.1/8\n", 2, "did you mean 10.0.0.0/8?"),
    ("privateRanges:\n  - 10.0.0.0/8\n  - 10.0.0.0/8\n", 3, "duplicate privateRanges entry"),
    ("privateRanges: [8]\n", 1, "a privateRanges entry must be a string, not number 8"),
    ("privateRanges: 10.0.0.0/8\n", 1, "privateRanges must be a list"),
    ("- a.com\n", 1, "an allowlist must be a mapping with allow:/deny: lists, not a list"),
    ("just a string\n", 1, 'not "just a string"'),
    ("allow:\n  - a.com\n - b.com\n", 3, "YAML syntax error: expected <block end>"),
    ("allow: [a.com\n", 2, "YAML syntax error: expected ',' or ']'"),
    ("allow:\n  - a.com\n\tdeny: []\n", 3, "YAML syntax error: found character '\\t'"),
    ('allow: ["a\x01"]\n', 1, "character '\\x01' is not allowed"),
    ("allow: [a.com]\n---\nallow: [b.com]\n", 3, "2 YAML documents in one file"),
    (
        "allow:\n  - host: a.com\n    <<: {ports: [1]}\n",
        3,
        "YAML merge keys (<<) are not supported",
    ),
    ("? [a]\n: b\n", 1, "keys of the allowlist must be names, not a list"),
    ("allow: !!binary aGVsbG8=\n", 1, "allow must be a list, not binary"),
    ("allow:\n  - !custom a.com\n", 2, "must be a string, not a value tagged !custom"),
]


@pytest.mark.parametrize(("doc", "line", "message"), REJECTED)
def test_rejected_bare_document(doc: str, line: int, message: str) -> None:
    found = problems(doc)
    assert len(found) == 1, found
    assert message in found[0].message
    assert found[0].line == line
    assert str(found[0]) == f"line {line}: {found[0].message}"
    assert validate_text(doc, source="x") == found


@pytest.mark.parametrize(("doc", "line", "message"), REJECTED)
def test_rejected_inside_configmap_manifest(doc: str, line: int, message: str) -> None:
    text = manifest(doc)
    found = problems(text)
    assert len(found) == 1, found
    # lines named inside a message are file lines too
    message = re.sub(r"line (\d+)", lambda m: f"line {int(m.group(1)) + MANIFEST_OFFSET}", message)
    assert message in found[0].message
    assert found[0].line == line + MANIFEST_OFFSET, (found[0], text)
    # the line named is the line of the file where the offending text is
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(text, source="cm.yaml")
    assert str(caught.value).startswith(f"cm.yaml:{line + MANIFEST_OFFSET}: ")


def test_manifest_line_mapping_with_deeper_indent_and_comments() -> None:
    text = textwrap.dedent(
        """\
        # the allowlist
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: egress-allowlist
          namespace: shop
        data:
          other: "x"
          allowlist.yaml: |  # rules
              allow:

                - a.com
                - "*"
        """
    )
    (found,) = problems(text)
    assert found.line == 13
    assert found.column == 11  # the opening quote
    assert '"*" is not a valid host pattern' in found.message


def test_manifest_quoted_value_names_the_embedded_line() -> None:
    text = 'kind: ConfigMap\ndata:\n  allowlist.yaml: "allow:\\n  - a.com\\n  - \\"*\\"\\n"\n'
    (found,) = problems(text)
    assert found.line is None
    assert found.message.startswith('allowlist.yaml line 3: "*" is not a valid host pattern')
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(text, source="cm.yaml")
    assert str(caught.value) == (
        'cm.yaml: allowlist.yaml line 3: "*" is not a valid host pattern: '
        'only a leading "*." wildcard is allowed'
    )


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
            "data:\n  allow.yaml: |\n    allow: []\n",
            4,
            'the ConfigMap has no "allowlist.yaml" key in data (it has: allow.yaml)',
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\ndata:\n  a: x\n  b: y\n",
            3,
            "(it has: a, b)",
        ),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", 1, "has no data mapping"),
        ("apiVersion: v1\nkind: Secret\ndata: {}\n", 2, "not kind: Secret"),
        ("apiVersion: v1\ndata: {}\n", 1, "not kind: (missing)"),
        ("kind: ConfigMap\ndata:\n  allowlist.yaml: 5\n", 3, "must be a string (use a | block)"),
        ("kind: ConfigMap\ndata:\n  allowlist.yaml: |\n", 4, "the document is empty"),
    ],
)
def test_rejected_manifests(text: str, line: int, message: str) -> None:
    (found,) = problems(text)
    assert message in found.message
    assert found.line == line


def test_all_problems_are_reported_each_with_its_line() -> None:
    doc = textwrap.dedent(
        """\
        mode: strict
        allow:
          - "*"
          - api.example.com
          - host: a.com
            ports: [0, 80]
            methods: [GET]
          - api.example.com
        deny:
          - 10.0.0.1/8
        colour: blue
        """
    )
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(doc, source="file:a.yaml")
    lines = [(p.line, p.message.split(":")[0]) for p in caught.value.problems]
    assert [line for line, _ in lines] == [1, 3, 6, 8, 10, 11]
    rendered = str(caught.value).splitlines()
    assert len(rendered) == 6
    assert rendered[0] == 'file:a.yaml:1: mode must be "enforce" or "audit", not "strict"'
    assert rendered[1].startswith('file:a.yaml:3: "*" is not a valid host pattern')
    assert rendered[5].startswith('file:a.yaml:11: unknown key "colour"')


def test_empty_text_is_rejected() -> None:
    for text in ("", "\n", "# only a comment\n", "---\n"):
        (found,) = problems(text)
        assert found.line == 1
        assert "the document is empty" in found.message


# -- fuzzing ---------------------------------------------------------------------------------

KEYS = st.sampled_from(
    [
        *("mode", "allow", "deny", "privateRanges", "host", "cidr", "ports", "methods", "paths"),
        *("kind", "data", "allowlist.yaml", "apiVersion", "x"),
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-70000, max_value=70000),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "*",
            "*.a.com",
            "a.com:443",
            "10.0.0.0/8",
            "10.0.0.1/8",
            "[::1]:443",
            "enforce",
            "GET",
            "/a/*",
            "ConfigMap",
            "bücher.example",
            "::1",
            "audit",
        ]
    ),
)
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(KEYS, children, max_size=5)
    ),
    max_leaves=25,
)


def _must_parse_or_reject(text: str) -> None:
    try:
        policy = parse_allowlist(text, source="fuzz")
    except AllowlistError as exc:
        assert exc.problems
        assert all(isinstance(p, Problem) and p.message for p in exc.problems)
        assert all(p.line is None or p.line >= 1 for p in exc.problems)
        str(exc)
        return
    assert isinstance(policy, Policy)
    policy.decide(Destination("a.com", 443))


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text: str) -> None:
    _must_parse_or_reject(text)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(STRUCTURES)
def test_fuzz_yaml_structures(value: Any) -> None:
    text = yaml.safe_dump(value, allow_unicode=True)
    _must_parse_or_reject(text)
    _must_parse_or_reject(yaml.safe_dump({"kind": "ConfigMap", "data": {"allowlist.yaml": text}}))
    _must_parse_or_reject(manifest(text))


@settings(deadline=None, max_examples=200)
@given(st.dictionaries(st.sampled_from(["allow", "deny", "privateRanges", "mode"]), STRUCTURES))
def test_fuzz_allowlist_shaped(value: dict[str, Any]) -> None:
    _must_parse_or_reject(yaml.safe_dump(value, allow_unicode=True))


LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOST = st.lists(LABEL, min_size=2, max_size=4).map(".".join)
RULE_SPEC = st.tuples(HOST, st.booleans(), st.one_of(st.none(), st.integers(1, 65535)))


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(st.lists(RULE_SPEC, max_size=8, unique_by=lambda r: (r[0], r[1])))
def test_generated_documents_round_trip(specs: list[tuple[str, bool, int | None]]) -> None:
    """A document written from rules parses back to rules that allow what they name."""
    entries: list[Any] = []
    for host, wildcard, port in specs:
        name = f"*.{host}" if wildcard else host
        # a wildcard on a public suffix (e.g. a generated "ab.ca") needs broad: true
        entries.append({"host": name, "ports": [port or 443], "broad": True})
    policy = parse_allowlist(yaml.safe_dump({"allow": entries}), source="gen")
    assert policy.rule_count == len(specs)
    for host, wildcard, port in specs:
        target = f"sub.{host}" if wildcard else host
        assert policy.decide(Destination(target, port or 443)).verdict is Verdict.ALLOW
    again = parse_allowlist(manifest(yaml.safe_dump({"allow": entries})), source="gen")
    assert [r.key for r in again.allow_rules] == [r.key for r in policy.allow_rules]


@pytest.mark.parametrize("header", ["|", "|-", "|+", "|2", "|2-", "|  # comment"])
def test_manifest_block_scalar_variants_map_lines(header: str) -> None:
    text = (
        "kind: ConfigMap\ndata:\n  allowlist.yaml: "
        + header
        + "\n    allow:\n      - a.com\n      - 'b*.com'\n"
    )
    (found,) = problems(text)
    assert (found.line, found.column) == (6, 9)


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(
    st.lists(HOST, min_size=1, max_size=6, unique=True),
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=3, max_value=8),  # deeper than the "allowlist.yaml:" key
    st.integers(min_value=0, max_value=3),
)
def test_manifest_problem_line_is_the_file_line_of_the_bad_rule(
    hosts: list[str], position: int, indent: int, blank_lines: int
) -> None:
    entries = [f"  - {host}" for host in hosts]
    entries.insert(min(position, len(entries)), "  - bad*.example")
    doc = "allow:\n" + "\n" * blank_lines + "\n".join(entries) + "\n"
    text = manifest(doc, indent=indent)
    (found,) = problems(text)
    assert found.line is not None
    assert text.splitlines()[found.line - 1].strip() == "- bad*.example"
    assert found.column is not None
    assert text.splitlines()[found.line - 1][found.column - 1 :] == "bad*.example"


def test_a_rule_reports_its_target_and_its_conditions() -> None:
    doc = (
        "allow:\n  - host: '*'\n    ports: [0]\n    methods: ['G T']\n"
        "  - ports: [80]\n    paths: [x]\n"
    )
    found = problems(doc)
    assert [(p.line, p.message.split(" ")[0]) for p in found] == [
        (2, '"*"'),
        (3, "port"),
        (4, '"G'),
        (5, "a"),
        (6, "path"),
    ]


def test_rules_with_the_same_ports_share_one_port_set() -> None:
    """A generated allowlist repeats a few port sets over thousands of rules: one object each
    (2 MiB of duplicates at 10,000 rules); a different set stays its own."""
    text = "allow:\n" + "".join(
        f"  - host: s{i}.example.com\n    ports: [{'8443, 443' if i % 2 else '443, 8443'}]\n"
        for i in range(6)
    )
    text += "  - host: other.example.com\n    ports: [443]\n"
    rules = parse_allowlist(text, source="src.yaml").allow_rules
    assert {id(r.ports) for r in rules[:6]} == {id(rules[0].ports)}
    assert rules[0].ports == frozenset({443, 8443})
    assert rules[6].ports == frozenset({443}) and rules[6].ports is not rules[0].ports
