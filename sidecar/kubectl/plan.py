"""The pure part of `kubectl egress`: workload names, merging what pods saw, `suggest`'s proposal,
`diff`'s classification, and the tables. No I/O, no Kubernetes client: table-driven tests.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from publicsuffixlist import PublicSuffixList

from sidecar.destinations import SeenDestination
from sidecar.policy.addresses import is_public
from sidecar.policy.dns import rule_name
from sidecar.policy.engine import Policy
from sidecar.policy.errors import AllowlistError, InvalidHost
from sidecar.policy.hosts import normalize_host, parse_ip
from sidecar.policy.model import (
    Decision,
    Destination,
    IPAddress,
    IPNetwork,
    Mode,
    Reason,
    Verdict,
)
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import apply_mode

# -- workloads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadKind:
    kind: str  # Deployment
    resource: str  # deployments
    short: str  # deploy


WORKLOAD_KINDS: Final = (
    WorkloadKind("Deployment", "deployments", "deploy"),
    WorkloadKind("StatefulSet", "statefulsets", "sts"),
    WorkloadKind("DaemonSet", "daemonsets", "ds"),
)
_ALIASES: Final = {
    alias: k
    for k in WORKLOAD_KINDS
    for alias in (
        k.short,
        k.kind.lower(),
        k.resource,
        f"{k.resource}.apps",
        f"{k.kind.lower()}.apps",
    )
}


class UsageError(ValueError):
    """Something on the command line cannot be understood (exit 2, with this message)."""


@dataclass(frozen=True)
class WorkloadRef:
    kind: WorkloadKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.short}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> WorkloadRef:
        """``deploy/web``, ``deployment/web``, ``sts/db``, ``ds/agent`` (kubectl's spellings)."""
        kind_text, sep, name = text.partition("/")
        kind = _ALIASES.get(kind_text.lower())
        if not sep or not name or "/" in name:
            raise UsageError(f"{text!r} is not KIND/NAME (e.g. deploy/web)")
        if kind is None:
            raise UsageError(
                f"{kind_text!r} is not a workload kind: use deploy/NAME, sts/NAME or ds/NAME"
            )
        return cls(kind, name)


def label_selector(selector: Mapping[str, Any] | None) -> str:
    """A workload's ``spec.selector`` as the API's ``labelSelector`` query text."""
    terms: list[str] = []
    for key, value in sorted(((selector or {}).get("matchLabels") or {}).items()):
        terms.append(f"{key}={value}")
    for expr in (selector or {}).get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(str(key))
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    if not terms:
        # An empty selector selects every pod of the namespace: never what a workload means.
        raise ValueError("the workload has an empty selector")
    return ",".join(terms)


# -- what the pods saw ----------------------------------------------------------------------------

type SeenKey = tuple[str, int, str, str, str, str, str | None]


def _key(s: SeenDestination) -> SeenKey:
    return (s.host, s.port, s.capture, s.protocol, s.decision, s.reason, s.rule)


def merge_seen(per_pod: Iterable[Sequence[SeenDestination]]) -> list[SeenDestination]:
    """One list for a workload: counts added, the earliest first and latest last seen, and the
    address filled in where only another entry of the same host knows it."""
    merged: dict[SeenKey, SeenDestination] = {}
    for seen in per_pod:
        for s in seen:
            old = merged.get(_key(s))
            if old is None:
                merged[_key(s)] = s
                continue
            latest = s if s.last_seen >= old.last_seen else old
            merged[_key(s)] = SeenDestination(
                s.host,
                s.port,
                s.capture,
                s.protocol,
                s.decision,
                s.reason,
                s.rule,
                old.count + s.count,
                min(old.first_seen, s.first_seen),
                latest.last_seen,
                latest.address,
            )
    # A call denied by name was never resolved (no address); another call to the same host
    # that was tells where it would connect, and so whether the guard would stand in the way.
    resolved: dict[str, SeenDestination] = {}
    for s in merged.values():
        host = s.host.lower().rstrip(".")
        if s.address and (host not in resolved or s.last_seen > resolved[host].last_seen):
            resolved[host] = s
    filled = [
        dataclasses.replace(s, address=resolved[s.host.lower().rstrip(".")].address)
        if s.address is None and s.host.lower().rstrip(".") in resolved
        else s
        for s in merged.values()
    ]
    return sorted(filled, key=lambda s: (s.host, s.port, s.protocol, s.decision))


_NOT_HTTP: Final = frozenset({"CONNECT", "TLS", "TCP"})


def destination_of(seen: SeenDestination) -> Destination:
    """The call as a policy can decide it again: the method where it was visible (plain HTTP)
    and the address it was connected to (the guard applies again, with the pod's ranges: see
    ``extra_ranges``). The path is never kept, so a rule with ``paths`` cannot decide it again
    (see ``classify``)."""
    literal = parse_ip(seen.host)
    method = None if seen.protocol in _NOT_HTTP else seen.protocol
    address: IPAddress | None = None
    if seen.address:
        try:
            address = ipaddress.ip_address(seen.address)
        except ValueError:
            address = None
    if literal is not None:
        return Destination(None, seen.port, literal, method)
    return Destination(seen.host, seen.port, address, method)


def _address(seen: SeenDestination) -> IPAddress | None:
    literal = parse_ip(seen.host)
    if literal is not None:
        return literal
    try:
        return ipaddress.ip_address(seen.address) if seen.address else None
    except ValueError:
        return None


def is_private(seen: SeenDestination, ranges: Sequence[IPNetwork]) -> bool:
    """Whether the private-address guard stands in the way: a non-public address outside the
    ranges where it steps aside (the documents' privateRanges, the pod's own)."""
    if seen.reason == Reason.PRIVATE_ADDRESS.value:
        return True
    address = _address(seen)
    if address is None or is_public(address):
        return False
    return not any(address.version == n.version and address in n for n in ranges)


# -- suggest --------------------------------------------------------------------------------------

DEFAULT_WILDCARD_MIN: Final = 3


@dataclass(frozen=True)
class Proposal:
    """One rule `suggest` proposes, and the destinations it comes from."""

    rule: str | dict[str, Any]  # as it goes into the allowlist's allow list
    sources: tuple[SeenDestination, ...]
    private: bool = False
    added: bool = True  # False: a private destination left out, shown commented

    @property
    def text(self) -> str:
        return flow(self.rule)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.sources)

    @property
    def last_seen(self) -> str:
        return max(s.last_seen for s in self.sources)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.host for s in self.sources))

    def comment(self) -> str:
        calls = f"{self.count} call{'s' if self.count != 1 else ''}"
        hosts = self.hosts
        if isinstance(self.rule, str) and self.rule.startswith("*."):
            calls += f" to {len(hosts)} hosts ({', '.join(hosts)})"
        elif self.private:
            calls += f" to {', '.join(hosts)}"
        text = f"{calls}, last seen {self.last_seen}"
        if self.private:
            text = "PRIVATE address: " + text
            if not self.added:
                text += "; left out (--private adds it)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "added": self.added,
            "private": self.private,
            "count": self.count,
            "last_seen": self.last_seen,
            "hosts": list(self.hosts),
        }


@dataclass(frozen=True)
class Skipped:
    destination: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"destination": self.destination, "reason": self.reason}


@dataclass
class Suggestion:
    document: str  # the proposed allowlist.yaml
    proposals: list[Proposal]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def added(self) -> list[Proposal]:
        return [p for p in self.proposals if p.added]


def flow(value: Any) -> str:
    """One YAML node on one line (flow style), quoted where YAML needs it (``'*.x.com'``)."""
    text = yaml.safe_dump(
        value, default_flow_style=True, sort_keys=False, width=1 << 20, allow_unicode=True
    )
    return text.removesuffix("\n...\n").rstrip("\n")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.cache
def _suffixes() -> PublicSuffixList:
    # accept_unknown: a name under an unknown TLD (.internal, .test) groups by its last two
    # labels, as under a known one.
    return PublicSuffixList(accept_unknown=True)


def registrable_domain(host: str) -> str | None:
    domain = _suffixes().privatesuffix(host.lower().rstrip("."))
    return domain if isinstance(domain, str) else None


def _host_rule(host: str, ports: set[int]) -> str | dict[str, Any]:
    """The narrowest rule for these ports: ``h:p``, ``h`` (= 80 and 443), or a mapping."""
    if ports == {80, 443}:
        return host
    if len(ports) == 1:
        return hostport(host, next(iter(ports)))
    return {"host": host, "ports": sorted(ports)}


DNS: Final = "DNS"  # the protocol of the DNS listener's query decisions (port 53)
# Query decisions no allowlist changes: internal names are forwarded whatever the policy,
# zone transfers and ANY are refused whatever it says.
_DNS_FIXED: Final = frozenset({Reason.CLUSTER_INTERNAL.value, Reason.QUERY_TYPE.value})


def _norm(host: str) -> str:
    return host.lower().rstrip(".")


def decide_query_name(seen: SeenDestination, policy: Policy) -> Decision:
    """A DNS query decided again by its name (an SRV query's service labels dropped), as the
    DNS listener decides it; the internal names and refused types are not known here (see
    ``_DNS_FIXED``)."""
    try:
        host = normalize_host(rule_name(seen.host, "SRV"))
    except InvalidHost as err:
        return Decision(Verdict.DENY, Reason.INVALID_DESTINATION, detail=str(err))
    return policy.decide_name(host)


def _dns_denied_now(seen: SeenDestination, current: Policy | None) -> bool:
    if seen.decision == Verdict.ALLOW.value or seen.reason in _DNS_FIXED:
        return False
    return current is None or not decide_query_name(seen, current).permits


def _needs_rule(seen: SeenDestination, current: Policy | None) -> tuple[bool, str | None]:
    """Whether a seen destination needs a new rule; else why not (None: silently fine)."""
    if seen.decision == Verdict.ALLOW.value:
        return False, None
    if current is None:
        return True, None
    now = current.decide(destination_of(seen))
    if now.verdict is Verdict.ALLOW:
        return False, None  # the allowlist changed since: allowed now
    if now.reason is Reason.MATCHED_DENY:
        return False, f"denied by the deny rule {now.rule!r}: an allow rule cannot override it"
    if seen.reason in (Reason.INVALID_DESTINATION.value, Reason.UNRESOLVABLE.value):
        return False, f"{seen.reason}: no rule makes it work"
    return True, None


def propose(
    seen: Sequence[SeenDestination],
    current: Policy | None,
    *,
    wildcards: bool = False,
    wildcard_min: int = DEFAULT_WILDCARD_MIN,
    include_private: bool = False,
    extra_ranges: Sequence[IPNetwork] = (),
) -> tuple[list[Proposal], list[Skipped], list[str]]:
    """The rules that would allow what was seen and is not allowed yet. ``extra_ranges``: the
    pods' --allow-private-range (their ready body says), where the guard steps aside too."""
    if current is not None:
        current = current.with_extra_private_ranges(extra_ranges)
    ranges = [*extra_ranges, *(current.private_ranges if current is not None else ())]
    skipped: list[Skipped] = []
    warnings: list[str] = []
    by_host: dict[str, list[SeenDestination]] = {}
    by_cidr: dict[str, list[SeenDestination]] = {}
    connected = {_norm(s.host) for s in seen if s.protocol != DNS}
    for s in seen:
        if s.protocol == DNS:
            # A query is allowed by any rule naming the host: the rule proposed for the
            # connection that followed does it. A denied query with no connection after it
            # (NXDOMAIN ends the call) leaves the port unknown: said, not guessed.
            if _norm(s.host) not in connected and _dns_denied_now(s, current):
                skipped.append(
                    Skipped(
                        f"{s.host} (DNS)",
                        "its DNS query was denied, so the app never connected and the port "
                        "is unknown: add HOST:PORT if it needs it",
                    )
                )
            continue
        needed, why = _needs_rule(s, current)
        if not needed:
            if why:
                skipped.append(Skipped(hostport(s.host, s.port), why))
            continue
        private = is_private(s, ranges)
        if private or parse_ip(s.host) is not None:
            address = s.host if parse_ip(s.host) is not None else s.address
            if address is None:
                skipped.append(
                    Skipped(hostport(s.host, s.port), "private address, not known which one")
                )
                continue
            by_cidr.setdefault(address, []).append(s)
        else:
            by_host.setdefault(s.host.lower().rstrip("."), []).append(s)

    proposals: list[Proposal] = []
    grouped: dict[str, list[str]] = {}
    for host in by_host:
        domain = registrable_domain(host)
        if domain is not None and host != domain:
            grouped.setdefault(domain, []).append(host)
    wild: set[str] = set()
    for domain, hosts in sorted(grouped.items()):
        if len(hosts) < wildcard_min:
            continue
        if not wildcards:
            warnings.append(
                f"{len(hosts)} subdomains of {domain} were called: --wildcards would propose "
                f'"*.{domain}" instead of one rule each'
            )
            continue
        sources = [s for h in hosts for s in by_host[h]]
        ports = {s.port for s in sources}
        rule: str | dict[str, Any] = (
            f"*.{domain}" if ports == {80, 443} else {"host": f"*.{domain}", "ports": sorted(ports)}
        )
        proposals.append(Proposal(rule, tuple(sources)))
        wild.update(hosts)
    for host, sources in sorted(by_host.items()):
        if host not in wild:
            proposals.append(Proposal(_host_rule(host, {s.port for s in sources}), tuple(sources)))
    for address, sources in sorted(by_cidr.items()):
        ip = ipaddress.ip_address(address)
        cidr = f"{ip}/{ip.max_prefixlen}"
        private = any(is_private(s, ranges) for s in sources)
        rule = {"cidr": cidr, "ports": sorted({s.port for s in sources})}
        proposal = Proposal(
            rule, tuple(sources), private=private, added=include_private or not private
        )
        if private:
            names = ", ".join(dict.fromkeys(s.host for s in sources))
            warnings.append(
                f"{names} {'is' if ',' not in names else 'are'} a private address ({cidr}): "
                + (
                    "added as a cidr rule (--private); it lifts the private-address guard there"
                    if include_private
                    else "left out, commented in the proposal; --private adds it"
                )
            )
        proposals.append(proposal)
        named = sorted({_norm(s.host) for s in sources if parse_ip(s.host) is None})
        if private and include_private:
            # A cidr rule allows the address, not the name: the DNS listener answers only names
            # a rule names (transparent capture), so the name gets its rule too (the guard
            # still applies to it; the cidr rule is what lets the address through).
            for name in named:
                mine = tuple(s for s in sources if _norm(s.host) == name)
                ports = {s.port for s in mine}
                proposals.append(Proposal(_host_rule(name, ports), mine, private=True))
    return proposals, skipped, warnings


_TOP_ORDER: Final = ("mode", "allow", "deny", "privateRanges")


def render_allowlist(current: Mapping[str, Any] | None, proposals: Sequence[Proposal]) -> str:
    """The current document with the proposed rules appended to ``allow``, each with a comment
    (count, last seen). Current rules are kept as they are (one flow-style line each); their
    comments in the original text are not (the YAML is read, not edited as text)."""
    doc = dict(current or {})
    keys: list[str] = [k for k in _TOP_ORDER if k in doc or k == "allow"]
    keys += [k for k in doc if k not in keys]
    lines: list[str] = []
    for key in keys:
        value = doc.get(key)
        if key != "allow" and not isinstance(value, list):
            lines.append(f"{key}: {flow(value)}")
            continue
        items = list(value or []) if isinstance(value, list) else []
        if not items and not (key == "allow" and proposals):
            lines.append(f"{key}: []")
            continue
        lines.append(f"{key}:")
        lines.extend(f"  - {flow(item)}" for item in items)
        if key == "allow" and proposals:
            lines.append("  # proposed by kubectl egress suggest, from what the pods called:")
            for p in proposals:
                prefix = "  - " if p.added else "  # - "
                lines.append(f"{prefix}{p.text}  # {p.comment()}")
    return "\n".join(lines) + "\n"


def suggest(
    current_text: str | None,
    current: Policy | None,
    seen: Sequence[SeenDestination],
    *,
    wildcards: bool = False,
    wildcard_min: int = DEFAULT_WILDCARD_MIN,
    include_private: bool = False,
    extra_ranges: Sequence[IPNetwork] = (),
) -> Suggestion:
    proposals, skipped, warnings = propose(
        seen,
        current,
        wildcards=wildcards,
        wildcard_min=wildcard_min,
        include_private=include_private,
        extra_ranges=extra_ranges,
    )
    loaded = yaml.safe_load(current_text) if current_text else None
    document = render_allowlist(loaded if isinstance(loaded, dict) else None, proposals)
    # The proposal must be a valid allowlist that allows what it was built from.
    try:
        proposed = parse_allowlist(document, source="suggest").with_extra_private_ranges(
            extra_ranges
        )
    except AllowlistError as err:
        raise AssertionError(f"suggest built an invalid allowlist:\n{err}\n{document}") from err
    for p in proposals:
        if not p.added:
            continue
        for s in p.sources:
            decision = proposed.decide(destination_of(s))
            if decision.verdict is not Verdict.ALLOW:
                warnings.append(
                    f"{hostport(s.host, s.port)} would still be denied ({decision.reason.value})"
                )
    return Suggestion(document, proposals, skipped, warnings)


def configmap_manifest(name: str, namespace: str, document: str, header: Sequence[str] = ()) -> str:
    """A ConfigMap manifest whose allowlist.yaml is ``document`` as a literal block (comments
    kept), preceded by ``header`` comment lines."""
    out = [f"# {line}" if line else "#" for line in header]
    out += [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {flow(name)}",
        f"  namespace: {flow(namespace)}",
        "data:",
        "  allowlist.yaml: |",
    ]
    out += [f"    {line}" if line else "" for line in document.splitlines()]
    return "\n".join(out) + "\n"


# -- diff -----------------------------------------------------------------------------------------

ALLOW_TO_DENY: Final = "allow→deny"
AUDIT_TO_DENY: Final = "audit→deny"  # goes through today (audit), would be blocked
DEPENDS_ON_PATH: Final = "depends on path"
DENY_TO_ALLOW: Final = "deny→allow"
AUDIT_TO_ALLOW: Final = "audit→allow"
RULE_CHANGED: Final = "rule changed"
UNCHANGED: Final = "unchanged"
# Calls that would stop going through first, then the unknown, then the rest.
_CHANGE_ORDER: Final = (
    ALLOW_TO_DENY,
    AUDIT_TO_DENY,
    DEPENDS_ON_PATH,
    DENY_TO_ALLOW,
    AUDIT_TO_ALLOW,
    "deny→audit",
    "allow→audit",
    RULE_CHANGED,
    UNCHANGED,
)


@dataclass(frozen=True)
class Change:
    kind: str
    seen: SeenDestination
    after: Decision

    @property
    def before_allowed(self) -> bool:
        return self.seen.decision == Verdict.ALLOW.value

    def to_json(self) -> dict[str, Any]:
        return {
            "change": self.kind,
            "host": self.seen.host,
            "port": self.seen.port,
            "protocol": self.seen.protocol,
            "count": self.seen.count,
            "last_seen": self.seen.last_seen,
            "before": {
                "decision": self.seen.decision,
                "reason": self.seen.reason,
                "rule": self.seen.rule,
            },
            "after": {
                "decision": self.after.verdict.value,
                "reason": self.after.reason.value,
                "rule": self.after.rule,
            },
        }


def classify(seen: SeenDestination, new: Policy, mode: Mode = Mode.ENFORCE) -> Change:
    """Before: what the pod decided (allow, audit or deny). After: the new document's decision
    in ``mode`` (the workload's annotation, else the new document's own, else enforce); ``new``
    carries the pods' extra private ranges (see ``diff``). A plain-HTTP call the new document
    could only decide with its path (never kept) is "depends on path", not guessed."""
    before = seen.decision
    if seen.protocol == DNS and seen.reason in _DNS_FIXED:
        fixed = Decision(Verdict(before), Reason(seen.reason), seen.rule)
        return Change(UNCHANGED, seen, fixed)
    raw = decide_query_name(seen, new) if seen.protocol == DNS else new.decide(destination_of(seen))
    after = apply_mode(raw, mode)
    if raw.reason is Reason.L7_NOT_VISIBLE and seen.protocol not in _NOT_HTTP:
        if before == Verdict.ALLOW.value and seen.rule in {r.text for r in new.allow_rules}:
            # The rule that allowed it (paths and all) is in the new document as it was.
            return Change(UNCHANGED, seen, Decision(Verdict.ALLOW, Reason.MATCHED_ALLOW, seen.rule))
        return Change(DEPENDS_ON_PATH, seen, after)
    if before != after.verdict.value:
        kind = f"{before}→{after.verdict.value}"
    elif after.verdict is Verdict.ALLOW and seen.rule != after.rule:
        kind = RULE_CHANGED
    else:
        kind = UNCHANGED
    return Change(kind, seen, after)


def diff(
    seen: Sequence[SeenDestination],
    new: Policy,
    extra_ranges: Sequence[IPNetwork] = (),
    mode: Mode = Mode.ENFORCE,
) -> list[Change]:
    """Every seen destination classified; what would stop going through first, then by count
    (most calls first)."""
    policy = new.with_extra_private_ranges(extra_ranges)
    changes = [classify(s, policy, mode) for s in seen]
    order = {kind: i for i, kind in enumerate(_CHANGE_ORDER)}
    return sorted(
        changes,
        key=lambda c: (order.get(c.kind, len(order)), -c.seen.count, c.seen.host, c.seen.port),
    )


# -- tables ---------------------------------------------------------------------------------------

RED: Final = "\x1b[31m"
GREEN: Final = "\x1b[32m"
YELLOW: Final = "\x1b[33m"
RESET: Final = "\x1b[0m"
CHANGE_COLORS: Final = {
    ALLOW_TO_DENY: RED,
    AUDIT_TO_DENY: RED,
    DEPENDS_ON_PATH: YELLOW,
    DENY_TO_ALLOW: GREEN,
    AUDIT_TO_ALLOW: GREEN,
}


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], colors: Sequence[str | None] = ()
) -> str:
    """kubectl's look: upper-case headers, columns three spaces apart, no trailing blanks.
    ``colors[i]`` (an ANSI code) colours row i; widths are measured without it."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for n, row in enumerate([list(headers), *rows]):
        text = "   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        color = colors[n - 1] if n and n - 1 < len(colors) else None
        lines.append(f"{color}{text}{RESET}" if color else text)
    return "\n".join(lines) + "\n"


def decision_cell(decision: str, reason: str, rule: str | None) -> str:
    return f"{decision} ({reason}{': ' + rule if rule else ''})"


def diff_table(changes: Sequence[Change], *, color: bool) -> str:
    headers = ["CHANGE", "DESTINATION", "PROTOCOL", "CALLS", "LAST SEEN", "BEFORE", "AFTER"]
    rows = [
        [
            c.kind,
            hostport(c.seen.host, c.seen.port),
            c.seen.protocol,
            str(c.seen.count),
            c.seen.last_seen,
            decision_cell(c.seen.decision, c.seen.reason, c.seen.rule),
            decision_cell(c.after.verdict.value, c.after.reason.value, c.after.rule),
        ]
        for c in changes
    ]
    colors = [CHANGE_COLORS.get(c.kind) if color else None for c in changes]
    return render_table(headers, rows, colors)


def suggestion_table(suggestion: Suggestion) -> str:
    headers = ["RULE", "STATUS", "CALLS", "LAST SEEN", "FROM"]
    rows = [
        [
            p.text,
            ("added" if p.added else "left out") + (" (private)" if p.private else ""),
            str(p.count),
            p.last_seen,
            ", ".join(hostport(s.host, s.port) for s in p.sources),
        ]
        for p in suggestion.proposals
    ]
    rows += [[s.destination, "not proposed", "", "", s.reason] for s in suggestion.skipped]
    return render_table(headers, rows)
