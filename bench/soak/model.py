"""The soak's pure parts: allowlist versions, expected decisions, judging, aggregation, report.

No I/O here: the runner feeds in what the clients saw and what the sidecar logged, and gets a
report back, so that every rule that turns a run into pass or fail has a fast unit test.
"""

from __future__ import annotations

import bisect
import datetime as dt
import ipaddress
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Final

from sidecar.policy.parse import digest

DOMAIN: Final = "soak.test"

# Every request has a source address of its own, so that the sidecar's decision line (which
# names the client address, not its port) identifies exactly one request. 127.64.0.0/10 is
# loopback on Linux (all of 127/8 is), away from 127.0.0.x where services usually listen.
SOURCE_NETWORK: Final = ipaddress.IPv4Network("127.64.0.0/10")
MAX_SOURCES: Final = SOURCE_NETWORK.num_addresses - 2  # neither the first nor the last address


class Role(StrEnum):
    """What the two allowlist versions say about a host."""

    BOTH = "both"  # allowed by A and by B
    ONLY_A = "only-a"
    ONLY_B = "only-b"
    NEITHER = "neither"  # denied by both (an explicit deny rule)


HOSTS: Final[Mapping[Role, str]] = {role: f"{role.value}.{DOMAIN}" for role in Role}
SCHEMES: Final = ("http", "https")


class Outcome(StrEnum):
    """What a client saw. The first two are decisions; the rest are errors, by kind."""

    ALLOWED = "allowed"  # the upstream's 200 came back through the proxy
    DENIED = "denied"  # 403 with x-egress-decision: deny
    REFUSED = "connect refused"
    TIMEOUT = "timeout"
    RESET = "reset"
    CLOSED = "closed early"  # EOF before a complete response
    STATUS_5XX = "5xx"
    OTHER_STATUS = "other status"
    TLS = "tls error"
    OTHER = "other error"

    @property
    def is_error(self) -> bool:
        return self not in (Outcome.ALLOWED, Outcome.DENIED)


class SourceRangeError(ValueError):
    """A request number beyond what the source network can give a unique address to."""


def source_address(n: int) -> str:
    """The client address of request ``n`` (0-based): unique for every request of a run."""
    if not 0 <= n < MAX_SOURCES:
        raise SourceRangeError(f"request number {n} outside 0..{MAX_SOURCES - 1}")
    return str(SOURCE_NETWORK.network_address + 1 + n)


def plan(n: int) -> tuple[Role, str]:
    """Host role and scheme of request ``n``: every pair equally often, interleaved."""
    roles = list(Role)
    return roles[n % len(roles)], SCHEMES[(n // len(roles)) % len(SCHEMES)]


# -- allowlist versions ------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyVersion:
    label: str
    text: str  # the allowlist file as written
    allows: frozenset[str]  # the host names the harness expects this version to allow

    @property
    def digest(self) -> str:
        """The version the sidecar reports for this file (its digest, computed the same way)."""
        return digest(self.text)

    def expects_allow(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allows


def allowlist_text(
    label: str, allows: Iterable[str], denies: Iterable[str], ports: Sequence[int]
) -> str:
    port_list = ", ".join(str(p) for p in ports)
    lines = [f"# egress-sidecar soak: allowlist version {label}", "mode: enforce", "allow:"]
    for host in allows:
        lines += [f"  - host: {host}", f"    ports: [{port_list}]"]
    lines.append("deny:")
    lines += [f"  - {host}" for host in denies]
    return "\n".join(lines) + "\n"


def versions(ports: Sequence[int]) -> tuple[PolicyVersion, PolicyVersion]:
    """Version A allows ``both`` and ``only-a``; B allows ``both`` and ``only-b``; both deny
    ``neither`` with a deny rule."""
    out = []
    for label, own in (("A", Role.ONLY_A), ("B", Role.ONLY_B)):
        allows = (HOSTS[Role.BOTH], HOSTS[own])
        text = allowlist_text(label, allows, [HOSTS[Role.NEITHER]], ports)
        out.append(PolicyVersion(label, text, frozenset(allows)))
    return out[0], out[1]


# -- what the sidecar logged -------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionLine:
    """The fields of one JSON decision line (sidecar stdout) that the soak uses."""

    client: str | None
    host: str | None
    method: str | None
    decision: str  # allow | deny | audit
    reason: str
    policy_version: str | None
    ts: float | None = None  # when the sidecar logged it (epoch seconds, ms resolution)

    @property
    def allows(self) -> bool:
        return self.decision in ("allow", "audit")  # audit lets the call through


def parse_decision_line(line: str) -> DecisionLine | None:
    """A decision line, or None for anything else (other output, a torn or foreign line)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("msg") != "egress decision":
        return None
    decision, reason = entry.get("decision"), entry.get("reason")
    if not isinstance(decision, str) or not isinstance(reason, str):
        return None

    def text(key: str) -> str | None:
        value = entry.get(key)
        return value if isinstance(value, str) else None

    return DecisionLine(
        text("client"),
        text("host"),
        text("method"),
        decision,
        reason,
        text("policy_version"),
        _epoch(text("ts")),
    )


def _epoch(iso: str | None) -> float | None:
    """``2026-12-02T05:48:51.102Z`` (the decision log's format) as epoch seconds."""
    if iso is None:
        return None
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # the log always says Z; a naive time is not one of its lines
    return when.timestamp()


# -- what a client saw -------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    n: int
    source: str  # the client address the sidecar logs
    scheme: str
    host: str
    outcome: Outcome
    seconds: float
    policy_version: str | None = None  # x-egress-policy-version of a 403
    detail: str | None = None  # status line or exception, for errors


# -- judging -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    wrong: bool
    why: str | None = None
    version: str | None = None  # label of the version that decided, when known
    attributed: bool = True  # False: a client outcome with no decision line to name its version


def judge(
    result: RequestResult | None,
    line: DecisionLine | None,
    by_digest: Mapping[str, PolicyVersion],
) -> Judgement:
    """Is this decision wrong? It is judged by the version that made it.

    The version is the one the decision line names (or, for a 403, the x-egress-policy-version
    header; both must agree). Around a flip either version may decide; what may never happen is
    a decision that disagrees with the version it names, a client outcome that disagrees with
    the decision, or an allow/deny that no version would make.
    """
    host = (line.host if line is not None else None) or (result.host if result else None) or "?"
    if line is not None:
        named = line.policy_version
        if (
            result is not None
            and result.policy_version is not None
            and (result.policy_version != named)
        ):
            return Judgement(
                True, f"403 names version {result.policy_version}, its decision line {named}"
            )
        if result is not None and not result.outcome.is_error:
            seen_allowed = result.outcome is Outcome.ALLOWED
            if seen_allowed != line.allows:
                return Judgement(
                    True, f"client saw {result.outcome.value} for a {line.decision} decision"
                )
        version = by_digest.get(named or "")
        if version is None:
            return Judgement(True, f"{line.decision} of {host} by unknown version {named}")
        if line.allows != version.expects_allow(host):
            return Judgement(
                True,
                f"{line.decision} of {host} by version {version.label}, which "
                + ("denies" if line.allows else "allows")
                + " it",
                version.label,
            )
        return Judgement(False, version=version.label)
    if result is None or result.outcome.is_error:
        return Judgement(False)  # nothing was decided (an error): nothing to attribute
    # A decision the client saw but the sidecar did not log: judge it by the 403's header, or,
    # for an allow, against both versions (right if either one allows it).
    if result.policy_version is not None:
        version = by_digest.get(result.policy_version)
        if version is None:
            return Judgement(True, f"denied {host} by unknown version {result.policy_version}")
        if version.expects_allow(host):
            return Judgement(True, f"denied {host} by version {version.label}, which allows it")
        return Judgement(False, version=version.label, attributed=False)
    allowed = result.outcome is Outcome.ALLOWED
    if not any(v.expects_allow(host) == allowed for v in by_digest.values()):
        return Judgement(True, f"{result.outcome.value} {host}, against every version", None, False)
    return Judgement(False, attributed=False)


# -- resources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started (negative: before)
    rss_mib: float
    fds: int
    cpu_s: float


@dataclass(frozen=True)
class Tolerance:
    """How far above the baseline the end may stay and still count as back to baseline.

    RSS: CPython keeps freed memory in its arenas and glibc's heap, so a process rarely returns
    to the byte; a leak shows as growth that scales with the requests served. The allowance is
    the larger of ``rss_mib`` and ``rss_fraction`` of the baseline. fds must come back almost
    exactly (a few for a lazily opened log or an upstream connection still closing).
    """

    rss_mib: float = 24.0
    rss_fraction: float = 0.15
    fds: int = 4

    def rss_limit(self, baseline: float) -> float:
        return baseline + max(self.rss_mib, baseline * self.rss_fraction)


@dataclass(frozen=True)
class Resources:
    start: Sample  # after the warm-up and a settle, before the measured load
    peak_rss_mib: float
    peak_fds: int
    end: Sample  # after the clients stopped and a settle
    tolerance: Tolerance
    rss_limit_mib: float
    fds_limit: int
    rss_back: bool
    fds_back: bool
    # least-squares RSS slope over the second half of the load: a leak keeps growing under
    # steady load while allocator warm-up flattens out (None: too few samples)
    rss_slope_mib_per_min: float | None = None
    samples: list[Sample] = field(default_factory=list)  # every second during the load

    @property
    def back_to_baseline(self) -> bool:
        return self.rss_back and self.fds_back


def summarize_resources(
    start: Sample, samples: Sequence[Sample], end: Sample, tolerance: Tolerance
) -> Resources:
    everything = [start, *samples, end]
    rss_limit = tolerance.rss_limit(start.rss_mib)
    fds_limit = start.fds + tolerance.fds
    return Resources(
        start=start,
        peak_rss_mib=max(s.rss_mib for s in everything),
        peak_fds=max(s.fds for s in everything),
        end=end,
        tolerance=tolerance,
        rss_limit_mib=rss_limit,
        fds_limit=fds_limit,
        rss_back=end.rss_mib <= rss_limit,
        fds_back=end.fds <= fds_limit,
        rss_slope_mib_per_min=rss_slope(samples),
        samples=list(samples),
    )


def rss_slope(samples: Sequence[Sample]) -> float | None:
    """MiB per minute, fitted over the second half of ``samples`` (at least 4 of them)."""
    if not samples:
        return None
    half = samples[0].t + (samples[-1].t - samples[0].t) / 2
    late = [s for s in samples if s.t >= half]
    if len(late) < 4:
        return None
    slope = statistics.linear_regression([s.t for s in late], [s.rss_mib for s in late]).slope
    return round(slope * 60, 3)


# -- reloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flip:
    at: float  # epoch seconds: the harness's new file was in place (or the sidecar applied it)
    label: str  # the version written (applied)


def parse_applied_line(line: str) -> tuple[float, str] | None:
    """(time, version) of the sidecar's ``allowlist applied`` log line (stderr), else None."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("msg") != "allowlist applied":
        return None
    ts, version = entry.get("ts"), entry.get("version")
    when = _epoch(ts) if isinstance(ts, str) else None
    if when is None or not isinstance(version, str):
        return None
    return when, version


@dataclass(frozen=True)
class Reloads:
    lags_ms: list[float]  # per flip: file replaced -> the sidecar logged "allowlist applied"
    unobserved: int  # flips the sidecar did not apply before the next one
    stale: int  # denials by a version the sidecar had replaced over STALE_AFTER before
    stale_max_ms: float  # how long after the swap the latest of those was logged


# A denial's line is written as it is decided; the swap is logged right after it is made. A
# denial by the old version logged this long after the swap took its policy before the swap
# and was held up (or the snapshot is not taken once per decision).
STALE_AFTER: Final = 0.1


def reload_figures(
    initial: str,
    flips: Sequence[Flip],
    applied: Sequence[Flip],
    decided: Iterable[tuple[float, str]],
) -> Reloads:
    """How fast the sidecar applied each flip, and whether denials followed the swap.

    ``initial`` is the version in force before the first ``applied`` event; ``decided`` holds
    (time, version label) of denials. Informational: a file source polls, so a reload lags; what
    must never happen is a decision its version would not make, which ``judge`` checks.
    """
    flips = sorted(flips, key=lambda f: f.at)
    applied = sorted(applied, key=lambda a: a.at)
    lags: list[float] = []
    unobserved = 0
    for i, flip in enumerate(flips):
        since = flips[i - 1].at if i > 0 else -math.inf
        until = flips[i + 1].at if i + 1 < len(flips) else math.inf
        first = next(
            (a.at for a in applied if a.label == flip.label and since < a.at < until), None
        )
        if first is None:
            unobserved += 1
        else:
            lags.append(round(max(first - flip.at, 0.0) * 1e3, 1))

    swaps = [a.at for a in applied]
    stale, stale_max = 0, 0.0
    for t, label in decided:
        # the versions the sidecar had in force at some moment of [t - STALE_AFTER, t]
        before = bisect.bisect_right(swaps, t - STALE_AFTER) - 1
        labels = {applied[before].label if before >= 0 else initial}
        labels.update(a.label for a in applied[before + 1 : bisect.bisect_right(swaps, t)])
        if label not in labels:
            stale += 1
            last = bisect.bisect_right(swaps, t) - 1
            stale_max = max(stale_max, t - applied[last].at if last >= 0 else 0.0)
    return Reloads(lags, unobserved, stale, round(stale_max * 1e3, 1))


# -- the report --------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100 * len(ordered)), 1)
    return ordered[rank - 1]


@dataclass(frozen=True)
class Report:
    seconds: float  # of measured load
    clients: int
    flips: int
    requests: int
    by_outcome: dict[str, int]
    by_target: dict[str, dict[str, int]]  # "https only-a" -> outcome -> count
    decisions_by_version: dict[str, int]  # version label (or unknown digest) -> decision lines
    wrong: int
    wrong_examples: list[str]
    unattributed: int  # client decisions without a decision line (judged against both versions)
    undecided_lines: int  # decision lines no client result matched (e.g. the client timed out)
    errors: int
    p50_ms: float
    p99_ms: float
    reloads: Reloads
    resources: Resources
    sidecar_cpu_s: float
    client_cpu_s: float  # of the soak's own process: is the load generator the bottleneck?
    problems: list[str] = field(default_factory=list)  # why the run fails, if it does

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rate"] = round(self.rate, 1)
        out["passed"] = self.passed
        out["resources"]["back_to_baseline"] = self.resources.back_to_baseline
        return out


MAX_EXAMPLES: Final = 20


def build_report(
    *,
    results: Sequence[RequestResult],
    lines: Iterable[DecisionLine],
    versions_: Sequence[PolicyVersion],
    seconds: float,
    clients: int,
    flips: Sequence[Flip],
    applied: Sequence[tuple[float, str]] = (),
    resources: Resources,
    sidecar_cpu_s: float,
    client_cpu_s: float = 0.0,
    problems: Sequence[str] = (),
) -> Report:
    """Join each client result to its decision line (by source address) and judge them all."""
    by_digest = {v.digest: v for v in versions_}
    by_source = {r.source: r for r in results}
    lines_by_source: dict[str, DecisionLine] = {}
    orphans: list[DecisionLine] = []
    extra_problems = list(problems)
    duplicated = 0
    for line in lines:
        if line.client is None or line.client not in by_source:
            orphans.append(line)
        elif line.client in lines_by_source:
            duplicated += 1  # one connection, one request: a second decision is a bug
        else:
            lines_by_source[line.client] = line
    if duplicated:
        extra_problems.append(f"requests with more than one decision line: {duplicated}")

    wrong: list[str] = []
    by_version: Counter[str] = Counter()
    unattributed = 0
    for result in results:
        verdict = judge(result, lines_by_source.get(result.source), by_digest)
        if verdict.wrong:
            wrong.append(f"request {result.n} ({result.scheme} {result.host}): {verdict.why}")
        if not verdict.attributed:
            unattributed += 1
    undecided = 0
    decided_at: list[tuple[float, str]] = []
    for line in [*lines_by_source.values(), *orphans]:
        version = by_digest.get(line.policy_version or "")
        by_version[version.label if version else str(line.policy_version)] += 1
        # Only denials time a reload: their line is written as they are decided, while an
        # allowed call's line waits for its outcome (the response, the tunnel's end).
        if version is not None and line.ts is not None and not line.allows:
            decided_at.append((line.ts, version.label))
    for line in orphans:
        undecided += 1
        verdict = judge(None, line, by_digest)
        if verdict.wrong:
            wrong.append(f"decision for {line.client} (no client result): {verdict.why}")

    by_outcome = Counter(r.outcome.value for r in results)
    by_target: dict[str, Counter[str]] = {}
    for r in results:
        role = next((role.value for role, host in HOSTS.items() if host == r.host), r.host)
        by_target.setdefault(f"{r.scheme} {role}", Counter())[r.outcome.value] += 1
    latencies = [r.seconds * 1e3 for r in results if not r.outcome.is_error]
    errors = sum(1 for r in results if r.outcome.is_error)

    if wrong:
        extra_problems.append(f"wrong decisions: {len(wrong)}")
    if not resources.rss_back:
        extra_problems.append(
            f"RSS not back to baseline: {resources.end.rss_mib:.1f} MiB at the end, "
            f"limit {resources.rss_limit_mib:.1f} MiB"
        )
    if not resources.fds_back:
        extra_problems.append(
            f"open fds not back to baseline: {resources.end.fds} at the end, "
            f"limit {resources.fds_limit}"
        )
    decided = by_outcome[Outcome.ALLOWED.value] + by_outcome[Outcome.DENIED.value]
    if decided == 0:
        extra_problems.append("no request was decided")
    missing = [v.label for v in versions_ if by_version[v.label] == 0]
    if decided and missing:
        extra_problems.append(f"no decision by version {', '.join(missing)}: flips not observed")

    return Report(
        seconds=seconds,
        clients=clients,
        flips=len(flips),
        requests=len(results),
        by_outcome={o.value: by_outcome[o.value] for o in Outcome if by_outcome[o.value]},
        by_target={k: dict(sorted(v.items())) for k, v in sorted(by_target.items())},
        decisions_by_version=dict(sorted(by_version.items())),
        wrong=len(wrong),
        wrong_examples=wrong[:MAX_EXAMPLES],
        unattributed=unattributed,
        undecided_lines=undecided,
        errors=errors,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        reloads=reload_figures(
            versions_[0].label,
            flips,
            [Flip(t, by_digest[v].label) for t, v in applied if v in by_digest],
            decided_at,
        ),
        resources=resources,
        sidecar_cpu_s=sidecar_cpu_s,
        client_cpu_s=client_cpu_s,
        problems=extra_problems,
    )


def render(report: Report) -> str:
    """The report as a Markdown table (what `make soak` prints)."""
    res, lags = report.resources, report.reloads.lags_ms
    rows: list[tuple[str, str]] = [
        ("load", f"{report.clients} clients, {report.seconds:.0f} s, {report.flips} flips"),
        ("requests", f"{report.requests:,} ({report.rate:,.1f}/s)"),
    ]
    rows += [(f"  {name}", f"{count:,}") for name, count in report.by_outcome.items()]
    rows += [
        ("wrong decisions", f"{report.wrong:,}"),
        ("errors", f"{report.errors:,}"),
        (
            "decisions by version",
            ", ".join(f"{k}: {v:,}" for k, v in report.decisions_by_version.items()) or "-",
        ),
        ("unattributed client decisions", f"{report.unattributed:,}"),
        ("decision lines without a client result", f"{report.undecided_lines:,}"),
        ("latency of decided requests p50 / p99", f"{report.p50_ms:.1f} / {report.p99_ms:.1f} ms"),
        (
            "file replaced -> applied by the sidecar p50 / max",
            f"{percentile(lags, 50):.0f} / {max(lags, default=0.0):.0f} ms "
            f"({report.reloads.unobserved} flips not applied)",
        ),
        (
            f"denials by a version replaced over {STALE_AFTER * 1e3:.0f} ms before",
            f"{report.reloads.stale:,} (latest {report.reloads.stale_max_ms:.0f} ms after)",
        ),
        (
            "sidecar RSS start / peak / end",
            f"{res.start.rss_mib:.1f} / {res.peak_rss_mib:.1f} / {res.end.rss_mib:.1f} MiB "
            f"(limit {res.rss_limit_mib:.1f}: {'ok' if res.rss_back else 'NOT back'})",
        ),
        (
            "sidecar RSS slope over the second half of the load",
            "-"
            if res.rss_slope_mib_per_min is None
            else f"{res.rss_slope_mib_per_min:+.2f} MiB/min",
        ),
        (
            "sidecar open fds start / peak / end",
            f"{res.start.fds} / {res.peak_fds} / {res.end.fds} "
            f"(limit {res.fds_limit}: {'ok' if res.fds_back else 'NOT back'})",
        ),
        (
            "CPU-s per 1k requests: sidecar / soak clients",
            f"{report.sidecar_cpu_s / report.requests * 1000:.2f} / "
            f"{report.client_cpu_s / report.requests * 1000:.2f}"
            if report.requests
            else "-",
        ),
    ]
    out = ["| soak | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "| target | " + " | ".join(o.value for o in Outcome) + " |"]
    out.append("|---" * (len(Outcome) + 1) + "|")
    for target, counts in report.by_target.items():
        out.append(
            f"| {target} | " + " | ".join(str(counts.get(o.value, 0)) for o in Outcome) + " |"
        )
    out.append("")
    out += [f"wrong: {w}" for w in report.wrong_examples]
    out.append("PASS" if report.passed else "FAIL: " + "; ".join(report.problems))
    return "\n".join(out) + "\n"
