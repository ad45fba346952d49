"""DNS in the decision core: which queries are answered, what an answer may carry, and the
addresses the pod learned from the answers it was given. No I/O (sidecar.dns does the wire).

Queries. A name no allow rule names (a deny rule for every port of it counts as naming it
closed) never reaches a resolver: data tunnelled in ``<data>.attacker.example`` goes nowhere,
and an unlisted name yields no address to try. cidr rules allow addresses, not names: a name
they should reach must be listed too, or be internal. Internal names, those equal to or under
a search domain of the pod's resolv.conf, ``svc.cluster.local`` or a configured domain, are
forwarded whatever the policy (cluster service discovery is not egress). Every query type is
decided by its name, so a TXT query to an allowed name is answered and one to anything else is
not; zone transfers and ANY are refused for every name that is not internal.

A denied query is answered NXDOMAIN (not REFUSED). Stub resolvers treat REFUSED as a broken
server: glibc tries the next name server and then reports a temporary failure (EAI_AGAIN),
which applications retry, with back-off, forever; NXDOMAIN is final, negative-cached and fails
the call at once, as the proxy's 403 does. The listener attaches an Extended DNS Error
(RFC 8914, "Blocked") whose text carries the reason, so ``dig`` still shows why.

Answers. The addresses in an answer to an allowed, non-internal name pass the address guard:
one that is not public is removed unless privateRanges or a cidr allow rule covers it (DNS
rebinding: a public name answering 169.254.169.254). An answer left with no address is denied
as ``private address``.

Learned addresses. Each permitted answer is remembered under the name the app asked for
(a CNAME chain keeps that name) until its TTL runs out. Raw TCP to such an address, on a port
that a host rule for that name lists explicitly (not 80 or 443, where TLS and HTTP name the
host themselves), is decided as a call to that name: ``host: mydb.example.com, ports: [5432]``
allows TCP to the addresses the pod was given for mydb.example.com.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sidecar.policy.addresses import classify, describe
from sidecar.policy.engine import DEFAULT_PORTS
from sidecar.policy.errors import InvalidHost
from sidecar.policy.hosts import normalize_host
from sidecar.policy.model import Decision, Destination, IPAddress, Reason, Verdict
from sidecar.policy.store import Snapshot, apply_mode

# Always internal (Kubernetes service names), beyond the pod's own search domains.
CLUSTER_SUFFIXES: tuple[str, ...] = ("svc.cluster.local",)
# Refused for any name that is not internal: a zone's whole content, or every type at once.
REFUSED_TYPES: frozenset[str] = frozenset({"AXFR", "IXFR", "ANY"})
# A host rule without explicit ports means 80/443, which carry their own name (SNI, Host):
# a learned address never stands in for it there.
NAMED_PORTS: frozenset[int] = DEFAULT_PORTS


def _suffixes(name: str) -> Iterable[str]:
    """``a.b.c`` → ``a.b.c``, ``b.c``, ``c``."""
    yield name
    dot = name.find(".")
    while dot >= 0:
        yield name[dot + 1 :]
        dot = name.find(".", dot + 1)


@dataclass(frozen=True, slots=True)
class InternalNames:
    """Domains forwarded whatever the policy: a name equal to or under one of them."""

    domains: frozenset[str]

    @classmethod
    def build(cls, search: Iterable[str] = (), extra: Iterable[str] = ()) -> InternalNames:
        """From resolv.conf's search domains and configured ones (``*.`` prefix accepted);
        names that do not normalize (a typo in resolv.conf) are skipped, as a resolver skips
        them."""
        domains: set[str] = set()
        for text in (*CLUSTER_SUFFIXES, *search, *extra):
            try:
                domains.add(normalize_host(text.strip().removeprefix("*.")))
            except InvalidHost:
                continue
        return cls(frozenset(domains))

    def covers(self, name: str) -> bool:
        """``name`` (normalized) is one of the domains or under one."""
        domains = self.domains
        return any(suffix in domains for suffix in _suffixes(name))


@dataclass(frozen=True, slots=True)
class QueryVerdict:
    """A query decided: the decision (mode applied), the name as rules compare it, and whether
    it was forwarded as internal (its answer is then neither filtered nor learned)."""

    decision: Decision
    name: str
    internal: bool = False


def rule_name(name: str, qtype: str) -> str:
    """The name the rules are asked about: an SRV query's service labels
    (``_ldap._tcp.example.com``) name no host; the host is what follows them."""
    if qtype != "SRV":
        return name
    labels = name.split(".")
    while len(labels) > 1 and labels[0].startswith("_"):
        labels.pop(0)
    return ".".join(labels)


def decide_name(snap: Snapshot, host: str) -> Decision:
    """The raw by-name decision of ``host`` (normalized) under ``snap`` (mode not applied)."""
    policy = snap.policy
    if policy is None:
        return Decision(Verdict.DENY, snap.unavailable or Reason.POLICY_NOT_LOADED)
    decision = policy.decide_name(host)
    if not snap.deleted_sources or not decision.permits:
        return decision
    if snap.live is not None and (live := snap.live.decide_name(host)).permits:
        return live
    return Decision(
        Verdict.DENY,
        Reason.POLICY_DELETED,
        decision.rule,
        detail=f"allowed only by {', '.join(snap.deleted_sources)}, which was deleted",
    )


def decide_query(snap: Snapshot, name: str, qtype: str, internal: InternalNames) -> QueryVerdict:
    """Whether a query for ``name`` (as asked, any spelling) of type ``qtype`` (its mnemonic,
    e.g. ``A``, ``TXT``) is forwarded; the mode is applied."""
    try:
        host = normalize_host(name)
    except InvalidHost as exc:
        raw = Decision(Verdict.DENY, Reason.INVALID_DESTINATION, detail=str(exc))
        return QueryVerdict(apply_mode(raw, snap.mode), name)
    if internal.covers(host):
        return QueryVerdict(Decision(Verdict.ALLOW, Reason.CLUSTER_INTERNAL), host, True)
    if qtype.upper() in REFUSED_TYPES:
        raw = Decision(Verdict.DENY, Reason.QUERY_TYPE, detail=f"{qtype} queries are refused")
        return QueryVerdict(apply_mode(raw, snap.mode), host)
    return QueryVerdict(apply_mode(decide_name(snap, rule_name(host, qtype)), snap.mode), host)


@dataclass(frozen=True, slots=True)
class Filtered:
    """An answer's addresses after the guard: those kept, and why each other one went."""

    kept: tuple[IPAddress, ...]
    removed: tuple[tuple[IPAddress, str], ...]

    @property
    def emptied(self) -> bool:
        """Every address was removed (an answer with none to begin with is not emptied)."""
        return not self.kept and bool(self.removed)


def filter_addresses(snap: Snapshot, addresses: Iterable[IPAddress]) -> Filtered:
    """DNS rebinding: the addresses of an allowed name's answer that the guard lets through."""
    kept: list[IPAddress] = []
    removed: list[tuple[IPAddress, str]] = []
    policy = snap.policy
    for address in addresses:
        if policy is not None and policy.guard_permits(address):
            kept.append(address)
        else:
            removed.append((address, describe(address, classify(address))))
    return Filtered(tuple(kept), tuple(removed))


def answer_denial(filtered: Filtered, name: str) -> Decision:
    """The decision for an answer the guard emptied."""
    detail = "; ".join(why for _, why in filtered.removed[:4])
    return Decision(Verdict.DENY, Reason.PRIVATE_ADDRESS, detail=f"{name}: {detail}")


class LearnedAddresses:
    """Name → addresses the pod's DNS answers gave it, each until its TTL runs out.

    Bounded: at ``max_entries`` (name, address) pairs the least recently learned pair goes.
    ``clock`` is injected (monotonic seconds) so expiry is tested without sleeping. Not
    thread-safe: the sidecar's event loop is its only user.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        min_ttl: float = 0.0,
        max_ttl: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._clock = clock
        self._expiry: OrderedDict[tuple[str, IPAddress], float] = OrderedDict()
        self._by_address: dict[IPAddress, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def learn(self, name: str, addresses: Iterable[IPAddress], ttl: float) -> None:
        """Remember ``addresses`` for ``name`` (normalized, the name asked) for ``ttl`` seconds,
        clamped to [min_ttl, max_ttl]; learning a pair again renews it."""
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        if ttl <= 0:
            return
        expires = self._clock() + ttl
        for address in addresses:
            key = (name, address)
            if key in self._expiry:
                self._expiry.move_to_end(key)
            self._expiry[key] = expires
            self._by_address.setdefault(address, {})[name] = None
        while len(self._expiry) > self.max_entries:
            (old_name, old_address), _ = self._expiry.popitem(last=False)
            self._unindex(old_name, old_address)

    def _unindex(self, name: str, address: IPAddress) -> None:
        names = self._by_address.get(address)
        if names is not None:
            names.pop(name, None)
            if not names:
                del self._by_address[address]

    def _drop(self, key: tuple[str, IPAddress]) -> None:
        del self._expiry[key]
        self._unindex(*key)

    def names_for(self, address: IPAddress) -> tuple[str, ...]:
        """The names ``address`` was learned for and has not expired for (expired pairs go)."""
        names = self._by_address.get(address)
        if not names:
            return ()
        now = self._clock()
        live: list[str] = []
        for name in list(names):
            key = (name, address)
            if self._expiry[key] > now:
                live.append(name)
            else:
                self._drop(key)
        return tuple(live)

    def addresses_for(self, name: str) -> tuple[IPAddress, ...]:
        """The live addresses learned for ``name`` (a scan: for tests and ``check``)."""
        now = self._clock()
        return tuple(a for (n, a), exp in self._expiry.items() if n == name and exp > now)

    def expire(self) -> int:
        """Drop every expired pair; how many went."""
        now = self._clock()
        gone = [key for key, exp in self._expiry.items() if exp <= now]
        for key in gone:
            self._drop(key)
        return len(gone)

    def recheck(self, keep: Callable[[str, IPAddress], bool]) -> int:
        """After a reload: drop every pair ``keep`` refuses (and the expired ones); how many
        went."""
        gone = self.expire()
        refused = [key for key in self._expiry if not keep(*key)]
        for key in refused:
            self._drop(key)
        return gone + len(refused)


def still_learnable(snap: Snapshot, name: str, address: IPAddress) -> bool:
    """Whether a learned pair would still be learned under ``snap`` (the reload re-check)."""
    if not decide_name(snap, name).permits:
        return False
    policy = snap.policy
    return policy is not None and policy.guard_permits(address)


def learned_stream(
    snap: Snapshot, learned: LearnedAddresses | None, address: IPAddress | None, port: int
) -> tuple[Decision, str] | None:
    """Raw TCP to ``address``:``port`` decided by a name the pod learned it for: the raw
    decision (mode not applied) and that name, when a host rule with explicit ports including
    ``port`` names it and the whole policy (deny rules, the guard) permits the call to that
    name at that address. None: no learned name grants it (the cidr rules decide)."""
    if learned is None or address is None or port in NAMED_PORTS or snap.policy is None:
        return None
    for name in learned.names_for(address):
        rule = snap.policy.stream_host_rule(name, port)
        if rule is None:
            continue
        decision = snap.decide_raw(Destination(name, port, address))
        if decision.permits:
            return decision, name
    return None
