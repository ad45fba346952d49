"""The soak's pure parts: allowlist versions, source addresses, decision lines, judging, report."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.soak.model import (
    HOSTS,
    MAX_SOURCES,
    SCHEMES,
    SOURCE_NETWORK,
    DecisionLine,
    Flip,
    Outcome,
    PolicyVersion,
    RequestResult,
    Role,
    Sample,
    SourceRangeError,
    Tolerance,
    build_report,
    judge,
    parse_applied_line,
    parse_decision_line,
    percentile,
    plan,
    reload_figures,
    render,
    rss_slope,
    source_address,
    summarize_resources,
    versions,
)
from sidecar.policy.model import Destination, Verdict
from sidecar.policy.parse import parse_allowlist

PORTS = (18080, 18443)
A, B = versions(PORTS)
BY_DIGEST = {A.digest: A, B.digest: B}
BOTH, ONLY_A, ONLY_B, NEITHER = (HOSTS[r] for r in Role)


# -- allowlist versions ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [A, B], ids=["A", "B"])
@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("port", PORTS)
def test_the_real_policy_engine_decides_what_the_harness_expects(
    version: PolicyVersion, role: Role, port: int
) -> None:
    # as the soak runs it: the hosts resolve to 127.0.0.1, --allow-private-range 127.0.0.0/8
    policy = parse_allowlist(version.text, source="soak").with_extra_private_ranges(
        [ipaddress.ip_network("127.0.0.0/8")]
    )
    host = HOSTS[role]
    decision = policy.decide(Destination(host, port, ipaddress.ip_address("127.0.0.1")))
    assert (decision.verdict is Verdict.ALLOW) == version.expects_allow(host)


def test_the_versions_are_the_four_roles() -> None:
    assert A.allows == {BOTH, ONLY_A} and B.allows == {BOTH, ONLY_B}
    assert A.digest != B.digest
    assert A.digest.startswith("sha256:") and len(A.digest) == len("sha256:") + 12
    assert f"- {NEITHER}" in A.text.split("deny:")[1]  # an explicit deny rule, in both
    assert f"- {NEITHER}" in B.text.split("deny:")[1]


@pytest.mark.parametrize(
    ("host", "expected"),
    [(BOTH, True), (BOTH.upper(), True), (BOTH + ".", True), (ONLY_B, False), (NEITHER, False)],
)
def test_expects_allow_compares_like_the_policy(host: str, expected: bool) -> None:
    assert A.expects_allow(host) is expected


# -- source addresses and the request plan -----------------------------------------------------


@pytest.mark.parametrize(
    ("n", "address"),
    [(0, "127.64.0.1"), (255, "127.64.1.0"), (MAX_SOURCES - 1, "127.127.255.254")],
)
def test_source_address(n: int, address: str) -> None:
    assert source_address(n) == address


@pytest.mark.parametrize("n", [-1, MAX_SOURCES])
def test_source_address_out_of_range_names_the_number(n: int) -> None:
    with pytest.raises(SourceRangeError, match=str(n)):
        source_address(n)


@given(st.integers(0, MAX_SOURCES - 1), st.integers(0, MAX_SOURCES - 1))
def test_source_addresses_are_unique_loopback_addresses(a: int, b: int) -> None:
    address = ipaddress.ip_address(source_address(a))
    assert address in SOURCE_NETWORK and address.is_loopback
    assert (source_address(a) == source_address(b)) == (a == b)


@given(st.integers(0, 10**6))
def test_every_eight_requests_cover_every_host_and_scheme(start: int) -> None:
    pairs = {plan(n) for n in range(start, start + len(Role) * len(SCHEMES))}
    assert pairs == {(r, s) for r in Role for s in SCHEMES}


# -- decision lines ----------------------------------------------------------------------------

TS = 1796187600.25  # 2026-12-02T05:00:00.250Z
LINE = {
    "ts": "2026-12-02T05:00:00.250Z",
    "msg": "egress decision",
    "decision": "deny",
    "reason": "matched deny rule",
    "rule": NEITHER,
    "capture": "explicit",
    "protocol": "https",
    "host": NEITHER,
    "port": 18443,
    "method": "CONNECT",
    "client": "127.64.0.9",
    "policy_source": "file:/x",
    "policy_version": A.digest,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            json.dumps(LINE),
            DecisionLine(
                "127.64.0.9", NEITHER, "CONNECT", "deny", "matched deny rule", A.digest, TS
            ),
        ),
        (
            json.dumps({"msg": "egress decision", "decision": "allow", "reason": "x"}),
            DecisionLine(None, None, None, "allow", "x", None),
        ),
        (json.dumps({**LINE, "msg": "policy reloaded"}), None),
        (  # a time that is not the log's own format is dropped, the line kept
            json.dumps({**LINE, "ts": "yesterday"}),
            DecisionLine(
                "127.64.0.9", NEITHER, "CONNECT", "deny", "matched deny rule", A.digest, None
            ),
        ),
        (
            json.dumps({**LINE, "ts": "2026-12-02T05:00:00"}),  # no zone: not ours either
            DecisionLine(
                "127.64.0.9", NEITHER, "CONNECT", "deny", "matched deny rule", A.digest, None
            ),
        ),
        (json.dumps({**LINE, "decision": None}), None),
        (json.dumps([LINE]), None),
        ('{"msg": "egress decision", "decis', None),  # torn
        ("Traceback (most recent call last):", None),
        ("", None),
    ],
)
def test_parse_decision_line(text: str, expected: DecisionLine | None) -> None:
    assert parse_decision_line(text) == expected


@given(st.text())
def test_parse_decision_line_never_raises(text: str) -> None:
    parse_decision_line(text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(sorted(LINE)), JSON_VALUES))
def test_parse_decision_line_keeps_only_well_typed_fields(fields: dict[str, Any]) -> None:
    entry = {**fields, "msg": "egress decision"}
    parsed = parse_decision_line(json.dumps(entry))
    if not isinstance(entry.get("decision"), str) or not isinstance(entry.get("reason"), str):
        assert parsed is None
        return
    assert parsed is not None
    for key, value in (("client", parsed.client), ("host", parsed.host)):
        assert value == (entry.get(key) if isinstance(entry.get(key), str) else None)


# -- judging -----------------------------------------------------------------------------------


def result(
    host: str, outcome: Outcome, version: str | None = None, scheme: str = "https"
) -> RequestResult:
    return RequestResult(1, "127.64.0.2", scheme, host, outcome, 0.01, version)


def line(host: str, decision: str, version: str | None) -> DecisionLine:
    return DecisionLine("127.64.0.2", host, "CONNECT", decision, "r", version)


J_CASES: list[tuple[str, RequestResult | None, DecisionLine | None, bool]] = [
    # (case, client result, decision line, wrong?)
    ("allow both by A", result(BOTH, Outcome.ALLOWED), line(BOTH, "allow", A.digest), False),
    ("allow both by B", result(BOTH, Outcome.ALLOWED), line(BOTH, "allow", B.digest), False),
    ("allow only-a by A", result(ONLY_A, Outcome.ALLOWED), line(ONLY_A, "allow", A.digest), False),
    ("allow only-a by B", result(ONLY_A, Outcome.ALLOWED), line(ONLY_A, "allow", B.digest), True),
    (
        "deny only-a by B",
        result(ONLY_A, Outcome.DENIED, B.digest),
        line(ONLY_A, "deny", B.digest),
        False,
    ),
    (
        "deny only-a by A",
        result(ONLY_A, Outcome.DENIED, A.digest),
        line(ONLY_A, "deny", A.digest),
        True,
    ),
    ("deny both by B", result(BOTH, Outcome.DENIED, B.digest), line(BOTH, "deny", B.digest), True),
    ("allow neither", result(NEITHER, Outcome.ALLOWED), line(NEITHER, "allow", A.digest), True),
    ("audit = allow", result(NEITHER, Outcome.ALLOWED), line(NEITHER, "audit", B.digest), True),
    ("audit of both", result(BOTH, Outcome.ALLOWED), line(BOTH, "audit", B.digest), False),
    ("unknown version", result(BOTH, Outcome.ALLOWED), line(BOTH, "allow", "sha256:0"), True),
    ("no version", result(BOTH, Outcome.ALLOWED), line(BOTH, "allow", None), True),
    (
        "403 header disagrees with the line",
        result(ONLY_B, Outcome.DENIED, A.digest),
        line(ONLY_B, "deny", B.digest),
        True,
    ),
    (
        "client through, line deny",
        result(NEITHER, Outcome.ALLOWED),
        line(NEITHER, "deny", A.digest),
        True,
    ),
    (
        "client 403, line allow",
        result(BOTH, Outcome.DENIED, A.digest),
        line(BOTH, "allow", A.digest),
        True,
    ),
    (
        "error, allow line judged",
        result(ONLY_A, Outcome.TIMEOUT),
        line(ONLY_A, "allow", A.digest),
        False,
    ),
    (
        "error, wrong line judged",
        result(ONLY_A, Outcome.RESET),
        line(ONLY_A, "allow", B.digest),
        True,
    ),
    ("error, no line", result(NEITHER, Outcome.REFUSED), None, False),
    ("no line, allow a flipping host", result(ONLY_A, Outcome.ALLOWED), None, False),
    ("no line, allow neither", result(NEITHER, Outcome.ALLOWED), None, True),
    ("no line, deny both", result(BOTH, Outcome.DENIED), None, True),
    ("no line, 403 names A for only-b", result(ONLY_B, Outcome.DENIED, A.digest), None, False),
    ("no line, 403 names B for only-b", result(ONLY_B, Outcome.DENIED, B.digest), None, True),
    ("no line, 403 unknown version", result(NEITHER, Outcome.DENIED, "sha256:x"), None, True),
    ("line only, right", None, line(ONLY_B, "allow", B.digest), False),
    ("line only, wrong", None, line(ONLY_B, "allow", A.digest), True),
]


@pytest.mark.parametrize(
    ("res", "dec", "wrong"), [c[1:] for c in J_CASES], ids=[c[0] for c in J_CASES]
)
def test_judge(res: RequestResult | None, dec: DecisionLine | None, wrong: bool) -> None:
    verdict = judge(res, dec, BY_DIGEST)
    assert verdict.wrong is wrong, verdict
    assert (verdict.why is not None) is wrong


def test_judge_names_the_deciding_version() -> None:
    verdict = judge(result(ONLY_A, Outcome.ALLOWED), line(ONLY_A, "allow", B.digest), BY_DIGEST)
    assert verdict.version == "B"
    assert verdict.why == f"allow of {ONLY_A} by version B, which denies it"


# -- resources ---------------------------------------------------------------------------------


def s(rss: float, fds: int, t: float = 0.0) -> Sample:
    return Sample(t, rss, fds, 0.0)


@pytest.mark.parametrize(
    ("end", "rss_back", "fds_back"),
    [
        (s(100.0, 20), True, True),
        (s(124.0, 24), True, True),  # at the limits: 100 + max(24, 15) MiB, 20 + 4 fds
        (s(124.1, 20), False, True),
        (s(100.0, 25), True, False),
        (s(90.0, 18), True, True),  # below the baseline
    ],
)
def test_back_to_baseline(end: Sample, rss_back: bool, fds_back: bool) -> None:
    res = summarize_resources(s(100.0, 20), [s(300.0, 1020), s(150.0, 500)], end, Tolerance())
    assert (res.rss_back, res.fds_back) == (rss_back, fds_back)
    assert res.back_to_baseline is (rss_back and fds_back)
    assert (res.peak_rss_mib, res.peak_fds) == (300.0, 1020)


@pytest.mark.parametrize(
    ("rss", "slope"),
    [
        ([], None),
        ([100.0] * 8, 0.0),
        # warm-up growth in the first half does not count; 0.5 MiB/s later = 30 MiB/min
        ([100.0, 150.0, 190.0, 200.0, 200.5, 201.0, 201.5, 202.0], 30.0),
        ([100.0, 101.0, 102.0], None),  # too few samples in the second half
    ],
)
def test_rss_slope_over_the_second_half(rss: list[float], slope: float | None) -> None:
    samples = [s(v, 10, t=float(i)) for i, v in enumerate(rss)]
    assert rss_slope(samples) == slope


@pytest.mark.parametrize(("baseline", "limit"), [(100.0, 124.0), (400.0, 460.0)])
def test_rss_allowance_is_the_larger_of_absolute_and_fraction(
    baseline: float, limit: float
) -> None:
    assert Tolerance(rss_mib=24, rss_fraction=0.15).rss_limit(baseline) == pytest.approx(limit)


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [([], 50, 0.0), ([5.0], 99, 5.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.0), ([*range(1, 101)], 99, 99)],
)
def test_percentile(values: list[float], pct: float, expected: float) -> None:
    assert percentile(values, pct) == expected


# -- the report --------------------------------------------------------------------------------

OK_RESOURCES = summarize_resources(s(100.0, 20), [s(180.0, 900)], s(105.0, 21), Tolerance())


def req(
    n: int, role: Role, scheme: str, outcome: Outcome, version: str | None = None
) -> RequestResult:
    return RequestResult(
        n, source_address(n), scheme, HOSTS[role], outcome, 0.002 * (n + 1), version
    )


def dline(n: int, role: Role, decision: str, version: PolicyVersion) -> DecisionLine:
    return DecisionLine(source_address(n), HOSTS[role], "GET", decision, "r", version.digest)


def report_of(
    results: list[RequestResult], lines: list[DecisionLine], resources: Any = OK_RESOURCES
) -> Any:
    return build_report(
        results=results,
        lines=lines,
        versions_=[A, B],
        seconds=2.0,
        clients=4,
        flips=[Flip(1000.0, "B")],
        resources=resources,
        sidecar_cpu_s=0.5,
    )


GOOD_RESULTS = [
    req(0, Role.BOTH, "http", Outcome.ALLOWED),
    req(1, Role.ONLY_A, "http", Outcome.ALLOWED),
    req(2, Role.ONLY_B, "https", Outcome.DENIED, A.digest),
    req(3, Role.NEITHER, "https", Outcome.DENIED, B.digest),
    req(4, Role.ONLY_B, "https", Outcome.ALLOWED),
    req(5, Role.BOTH, "https", Outcome.TIMEOUT),
]
GOOD_LINES = [
    dline(0, Role.BOTH, "allow", A),
    dline(1, Role.ONLY_A, "allow", A),
    dline(2, Role.ONLY_B, "deny", A),
    dline(3, Role.NEITHER, "deny", B),
    dline(4, Role.ONLY_B, "allow", B),
]


def test_a_clean_run_passes_and_counts_everything() -> None:
    report = report_of(GOOD_RESULTS, GOOD_LINES)
    assert report.passed, report.problems
    assert report.requests == 6 and report.wrong == 0 and report.errors == 1
    assert report.by_outcome == {"allowed": 3, "denied": 2, "timeout": 1}
    assert report.by_target["https only-b"] == {"allowed": 1, "denied": 1}
    assert report.decisions_by_version == {"A": 3, "B": 2}
    assert (report.unattributed, report.undecided_lines) == (0, 0)
    assert report.rate == 3.0
    assert report.p50_ms == pytest.approx(6.0)  # of the 5 decided requests: 2, 4, 6, 8, 10 ms
    table = render(report)
    assert "| wrong decisions | 0 |" in table and table.rstrip().endswith("PASS")
    data = report.to_json()
    assert data["passed"] is True and data["resources"]["back_to_baseline"] is True
    json.dumps(data)  # serializable as is


@pytest.mark.parametrize(
    ("results", "lines", "problem"),
    [
        (  # the sidecar allowed only-b under A
            GOOD_RESULTS,
            [*GOOD_LINES[:4], dline(4, Role.ONLY_B, "allow", A)],
            "wrong decisions: 1",
        ),
        (  # a decision line without a client result is judged too
            GOOD_RESULTS,
            [*GOOD_LINES, dline(99, Role.NEITHER, "allow", B)],
            "wrong decisions: 1",
        ),
        (
            GOOD_RESULTS,
            [*GOOD_LINES, GOOD_LINES[0]],
            "requests with more than one decision line: 1",
        ),
        (  # only version A ever decided
            GOOD_RESULTS[:3],
            GOOD_LINES[:3],
            "no decision by version B: flips not observed",
        ),
        ([req(0, Role.BOTH, "http", Outcome.REFUSED)], [], "no request was decided"),
    ],
)
def test_a_run_fails_naming_why(
    results: list[RequestResult], lines: list[DecisionLine], problem: str
) -> None:
    report = report_of(results, lines)
    assert not report.passed
    assert problem in report.problems
    assert render(report).rstrip().endswith("FAIL: " + "; ".join(report.problems))


def test_resources_not_back_fail_the_run() -> None:
    leaky = summarize_resources(s(100.0, 20), [], s(200.0, 40), Tolerance())
    report = report_of(GOOD_RESULTS, GOOD_LINES, leaky)
    assert report.problems == [
        "RSS not back to baseline: 200.0 MiB at the end, limit 124.0 MiB",
        "open fds not back to baseline: 40 at the end, limit 24",
    ]
    assert "NOT back" in render(report)


def test_wrong_decisions_are_listed_with_the_request() -> None:
    report = report_of(GOOD_RESULTS, [*GOOD_LINES[:4], dline(4, Role.ONLY_B, "allow", A)])
    assert report.wrong_examples == [
        f"request 4 (https {ONLY_B}): allow of {ONLY_B} by version A, which denies it"
    ]


def test_client_decisions_without_a_line_are_counted_as_unattributed() -> None:
    report = report_of(GOOD_RESULTS, GOOD_LINES[:4])
    assert report.unattributed == 1 and report.wrong == 0


# -- reloads ---------------------------------------------------------------------------------

FLIPS = [Flip(10.0, "B"), Flip(12.0, "A"), Flip(14.0, "B")]
APPLIED = [Flip(1.0, "A"), Flip(10.2, "B"), Flip(12.05, "A"), Flip(15.0, "B")]


@pytest.mark.parametrize(
    ("decided", "stale", "stale_max_ms"),
    [
        ([], 0, 0.0),
        # each denial by the version the sidecar had in force
        ([(5.0, "A"), (10.1, "A"), (11.0, "B"), (12.5, "A"), (14.9, "A"), (15.5, "B")], 0, 0.0),
        # within 100 ms of the swap the old version may still be logged
        ([(10.29, "A"), (12.14, "B")], 0, 0.0),
        # later than that, it is stale: 10.5 is 300 ms after B was applied at 10.2
        ([(10.5, "A"), (13.0, "B"), (11.0, "B")], 2, 950.0),
        # a version the sidecar never had before that time
        ([(5.0, "B")], 1, 4000.0),
    ],
)
def test_reload_figures_stale_denials(
    decided: list[tuple[float, str]], stale: int, stale_max_ms: float
) -> None:
    reloads = reload_figures("A", FLIPS, APPLIED, decided)
    assert (reloads.stale, reloads.stale_max_ms) == (stale, stale_max_ms)


def test_reload_figures_lags_per_flip() -> None:
    reloads = reload_figures("A", FLIPS, APPLIED, [])
    assert reloads.lags_ms == [200.0, 50.0, 1000.0]
    assert reloads.unobserved == 0
    # a flip the sidecar never applied before the next flip
    missed = reload_figures("A", FLIPS, [Flip(1.0, "A"), Flip(12.05, "A")], [])
    assert (missed.lags_ms, missed.unobserved) == ([50.0], 2)
    # logged a moment before the harness took its own time: no negative lag
    early = reload_figures("A", [Flip(10.0, "B")], [Flip(9.99, "B")], [])
    assert early.lags_ms == [0.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"ts":"2026-12-02T05:00:00.250Z","level":"info","msg":"allowlist applied",'
            '"version":"sha256:abc","previous_version":null}',
            (TS, "sha256:abc"),
        ),
        ('{"ts":"2026-12-02T05:00:00.250Z","msg":"allowlist rejected","version":"x"}', None),
        ('{"ts":"bad","msg":"allowlist applied","version":"x"}', None),
        ('{"ts":"2026-12-02T05:00:00.250Z","msg":"allowlist applied"}', None),
        ("not json", None),
    ],
)
def test_parse_applied_line(text: str, expected: tuple[float, str] | None) -> None:
    assert parse_applied_line(text) == expected


def test_the_report_times_reloads_from_the_sidecars_own_log() -> None:
    lines = [
        DecisionLine(source_address(0), NEITHER, "GET", "deny", "r", A.digest, 999.0),
        DecisionLine(source_address(1), ONLY_B, "GET", "deny", "r", A.digest, 1000.5),
        # allowed lines are written when the call ends: not used for timing
        DecisionLine(source_address(2), BOTH, "GET", "allow", "r", A.digest, 1004.0),
    ]
    results = [
        req(0, Role.NEITHER, "http", Outcome.DENIED, A.digest),
        req(1, Role.ONLY_B, "http", Outcome.DENIED, A.digest),
        req(2, Role.BOTH, "http", Outcome.ALLOWED),
    ]
    applied = [(990.0, A.digest), (1000.25, B.digest), (1000.3, "sha256:other")]
    report = build_report(
        results=results,
        lines=lines,
        versions_=[A, B],
        seconds=2.0,
        clients=4,
        flips=[Flip(1000.0, "B")],
        applied=applied,
        resources=OK_RESOURCES,
        sidecar_cpu_s=0.5,
    )
    assert report.reloads.lags_ms == [250.0]
    assert (report.reloads.stale, report.reloads.stale_max_ms) == (1, 250.0)
    table = render(report)
    assert "| file replaced -> applied by the sidecar p50 / max | 250 / 250 ms" in table
    assert "| denials by a version replaced over 100 ms before | 1 (latest 250 ms after) |" in table
