"""The compiled policy: indexed rules and the decision procedure.

Deciding costs O(labels of the host + distinct CIDR prefix lengths), never O(rules): exact hosts
and wildcard suffixes live in dicts, CIDR rules in one dict per prefix length.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.policy.addresses import AddressClass, classify, describe
from sidecar.policy.errors import InvalidHost
from sidecar.policy.hosts import normalize_host, parse_ip
from sidecar.policy.model import (
    Decision,
    Destination,
    IPAddress,
    IPNetwork,
    Mode,
    PolicyMeta,
    Reason,
    Verdict,
)

DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES_RE = re.compile(r"/{2,}")


def _pct_normalize(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 section 5.2.4, segment by segment: what a server does before routing.
    if "." not in path:
        return path
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    result = "/".join(output)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    return result


def normalize_path(path: str) -> str:
    """The request path as rules compare it: no query or fragment, unreserved %-escapes decoded,
    repeated slashes collapsed, dot segments removed (``/a/../admin``, ``//admin`` and
    ``/%61dmin`` are all ``/admin``), so a deny rule's path cannot be dodged by respelling it."""
    for mark in ("?", "#"):
        cut = path.find(mark)
        if cut >= 0:
            path = path[:cut]
    if "%" in path:
        path = _PCT_RE.sub(_pct_normalize, path)
    if "//" in path:
        path = _SLASHES_RE.sub("/", path)  # most servers route //admin as /admin
    return _remove_dot_segments(path)


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A path condition: exact, or ``*`` matching any run of characters (a trailing ``*`` makes
    it a prefix match)."""

    text: str  # as written
    parts: tuple[str, ...]  # the normalized pattern split on "*"

    @classmethod
    def compile(cls, text: str) -> PathPattern:
        return cls(text, tuple(normalize_path(text).split("*")))

    def matches(self, path: str) -> bool:
        parts = self.parts
        if len(parts) == 1:
            return path == parts[0]
        first, last = parts[0], parts[-1]
        if len(path) < len(first) + len(last) or not path.startswith(first):
            return False
        if last and not path.endswith(last):
            return False
        position = len(first)
        end = len(path) - len(last)
        for middle in parts[1:-1]:
            found = path.find(middle, position, end)
            if found < 0:
                return False
            position = found + len(middle)
        return True


@dataclass(frozen=True, slots=True)
class Miss:
    """Why one allow rule did not permit a call."""

    detail: str
    took_port: bool  # the rule allows the port; its L7 conditions failed or were not visible
    reason: Reason = Reason.NO_MATCH

    def closer_than(self, other: Miss | None) -> bool:
        """Report the closest miss: a rule that took the port over one that did not."""
        return other is None or (self.took_port and not other.took_port)


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny rule, normalized. ``text`` is the rule as written in the document."""

    text: str
    host: str | None = None  # normalized; for a wildcard rule the suffix after "*."
    wildcard: bool = False
    network: IPNetwork | None = None
    ports: frozenset[int] | None = None  # None: allow rules mean 80 and 443, deny rules all
    methods: frozenset[str] | None = None  # uppercase
    paths: tuple[PathPattern, ...] | None = None
    line: int | None = None
    # HTTPS to this host is decrypted (opt-in; host allow rules only, parse.py refuses others),
    # so methods/paths are checked per HTTPS request.
    inspect: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity for duplicate detection: two rules with equal keys mean the same thing."""
        return (
            self.host,
            self.wildcard,
            self.network,
            self.ports,
            self.methods,
            None if self.paths is None else frozenset(p.parts for p in self.paths),
            self.inspect,
        )

    def allow_ports(self) -> frozenset[int]:
        return DEFAULT_PORTS if self.ports is None else self.ports

    def allow_failure(
        self, port: int, method: str | None, path: str | None, deferred: bool = False
    ) -> Miss | None:
        """Why this allow rule does not permit the call (None: it does).

        A condition the call does not show cannot be met: a rule with ``methods`` or ``paths``
        never grants a channel where they are not visible (a CONNECT tunnel, transparent TLS or
        TCP), or it would grant whatever goes through that channel. ``deferred``: an inspected
        TLS channel, whose every request is decided with its method and path: the channel is
        granted and the conditions are checked on each request.
        """
        if port not in self.allow_ports():
            allowed = ", ".join(str(p) for p in sorted(self.allow_ports()))
            return Miss(f'port {port} not allowed by "{self.text}" (ports {allowed})', False)
        hidden = [
            name
            for name, wanted, seen in (
                ("methods", self.methods, method),
                ("paths", self.paths, path),
            )
            if wanted is not None and seen is None
        ]
        if hidden and deferred:
            return None
        if hidden:
            return Miss(
                f'"{self.text}" allows only some {" and ".join(hidden)}, which this connection '
                "does not show (a CONNECT tunnel or TLS/TCP stream)",
                True,
                Reason.L7_NOT_VISIBLE,
            )
        if self.methods is not None and method is not None and method not in self.methods:
            return Miss(f'method {method} not allowed by "{self.text}"', True)
        if (
            self.paths is not None
            and path is not None
            and not any(p.matches(path) for p in self.paths)
        ):
            return Miss(f'path {path} not allowed by "{self.text}"', True)
        return None

    def deny_applies(self, port: int, method: str | None, path: str | None) -> bool:
        """Deny rules are broad: no ports = every port; L7 conditions apply only where known."""
        if self.ports is not None and port not in self.ports:
            return False
        if self.methods is not None and (method is None or method not in self.methods):
            return False
        return not (
            self.paths is not None
            and (path is None or not any(p.matches(path) for p in self.paths))
        )


def _plain(address: IPAddress) -> IPAddress:
    """The address rules compare: scope id dropped, IPv4-mapped IPv6 as its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


class _NetworkIndex:
    """Networks → rules, looked up in O(distinct prefix lengths)."""

    __slots__ = ("_lengths", "_tables")

    def __init__(self, items: Iterable[tuple[IPNetwork, Rule | None]]) -> None:
        self._tables: dict[tuple[int, int], dict[int, list[Rule | None]]] = {}
        for network, rule in items:
            key = (network.version, network.prefixlen)
            shift = network.max_prefixlen - network.prefixlen
            table = self._tables.setdefault(key, {})
            table.setdefault(int(network.network_address) >> shift, []).append(rule)
        self._lengths: dict[int, tuple[int, ...]] = {
            version: tuple(sorted((plen for v, plen in self._tables if v == version), reverse=True))
            for version in (4, 6)
        }

    def __bool__(self) -> bool:
        return bool(self._tables)

    def lookup(self, address: IPAddress) -> Iterator[Rule | None]:
        address = _plain(address)
        version = address.version
        bits = 32 if version == 4 else 128
        value = int(address)
        for plen in self._lengths[version]:
            entries = self._tables[(version, plen)].get(value >> (bits - plen))
            if entries:
                yield from entries

    def contains(self, address: IPAddress) -> bool:
        return next(self.lookup(address), False) is not False


class _HostIndex:
    """Exact hosts and wildcard suffixes → rules; lookup walks the host's suffixes."""

    __slots__ = ("_exact", "_wild")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._exact: dict[str, list[Rule]] = {}
        self._wild: dict[str, list[Rule]] = {}
        for rule in rules:
            if rule.host is None:
                continue
            target = self._wild if rule.wildcard else self._exact
            target.setdefault(rule.host, []).append(rule)

    def lookup(self, host: str) -> Iterator[Rule]:
        exact = self._exact.get(host)
        if exact:
            yield from exact
        if not self._wild:
            return
        dot = host.find(".")
        while dot >= 0:  # longest suffix first: the most specific wildcard
            rules = self._wild.get(host[dot + 1 :])
            if rules:
                yield from rules
            dot = host.find(".", dot + 1)


def _deny(reason: Reason, rule: Rule | None = None, detail: str | None = None) -> Decision:
    return Decision(Verdict.DENY, reason, rule.text if rule is not None else None, detail)


def _missed(failure: Miss | None, otherwise: str) -> Decision:
    if failure is None:
        return _deny(Reason.NO_MATCH, detail=otherwise)
    return _deny(failure.reason, detail=failure.detail)


def _allow(rule: Rule) -> Decision:
    return Decision(Verdict.ALLOW, Reason.MATCHED_ALLOW, rule.text)


class Policy:
    """An immutable compiled allowlist. Build one with ``parse_allowlist`` or ``combine``."""

    __slots__ = (
        "_allow",
        "_allow_cidr",
        "_allow_hosts",
        "_cidr_allow_ports",
        "_deny",
        "_deny_cidr",
        "_deny_hosts",
        "_frozen",
        "_inspects",
        "_private",
        "meta",
        "private_ranges",
    )

    meta: PolicyMeta
    private_ranges: tuple[IPNetwork, ...]
    _allow: tuple[Rule, ...]
    _deny: tuple[Rule, ...]
    _allow_hosts: _HostIndex
    _deny_hosts: _HostIndex
    _allow_cidr: _NetworkIndex
    _deny_cidr: _NetworkIndex
    _private: _NetworkIndex
    _cidr_allow_ports: frozenset[int]
    _frozen: bool
    _inspects: bool

    def __init__(
        self,
        meta: PolicyMeta,
        allow: Sequence[Rule] = (),
        deny: Sequence[Rule] = (),
        private_ranges: Iterable[IPNetwork] = (),
    ) -> None:
        ranges = list(dict.fromkeys(private_ranges))  # de-duplicated, first-seen order
        set_ = object.__setattr__
        set_(self, "meta", meta)
        set_(self, "private_ranges", tuple(ranges))
        set_(self, "_allow", tuple(allow))
        set_(self, "_deny", tuple(deny))
        set_(self, "_allow_hosts", _HostIndex(allow))
        set_(self, "_deny_hosts", _HostIndex(deny))
        set_(self, "_allow_cidr", _NetworkIndex((r.network, r) for r in allow if r.network))
        set_(self, "_deny_cidr", _NetworkIndex((r.network, r) for r in deny if r.network))
        set_(self, "_private", _NetworkIndex((n, None) for n in ranges))
        ports: set[int] = set()
        for rule in allow:
            if rule.network is not None:
                ports |= rule.allow_ports()
        set_(self, "_cidr_allow_ports", frozenset(ports))
        # Most policies inspect nothing: every CONNECT and ClientHello asks, so answer at once.
        set_(self, "_inspects", any(rule.inspect for rule in allow))
        set_(self, "_frozen", True)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Policy is immutable (tried to set {name})")

    def __repr__(self) -> str:
        return (
            f"Policy(source={self.meta.source!r}, version={self.meta.version!r}, "
            f"allow={len(self._allow)}, deny={len(self._deny)}, "
            f"private_ranges={[str(n) for n in self.private_ranges]})"
        )

    @classmethod
    def empty(cls, meta: PolicyMeta) -> Policy:
        """A policy with no rules: every call is denied with NO_MATCH."""
        return cls(meta)

    @property
    def allow_rules(self) -> tuple[Rule, ...]:
        return self._allow

    @property
    def deny_rules(self) -> tuple[Rule, ...]:
        return self._deny

    @property
    def rule_count(self) -> int:
        return len(self._allow) + len(self._deny)

    def with_extra_private_ranges(self, ranges: Iterable[IPNetwork]) -> Policy:
        """The same rules with more ranges where the guard steps aside (--allow-private-range)."""
        return Policy(self.meta, self._allow, self._deny, (*self.private_ranges, *ranges))

    # -- deciding -------------------------------------------------------------------------------

    def decide(self, dest: Destination) -> Decision:
        """The raw decision for one call (the mode is applied by the caller)."""
        port = dest.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return _deny(Reason.INVALID_DESTINATION, detail=f"port {port!r} is not 1..65535")
        method = dest.method.upper() if dest.method is not None else None
        path = normalize_path(dest.path) if dest.path is not None else None
        if dest.host is None:
            if dest.address is None:
                return _deny(Reason.INVALID_DESTINATION, detail="no host and no address")
            return self._decide_address(dest.address, port, method, path)
        try:
            host = normalize_host(dest.host)
        except InvalidHost as exc:
            return _deny(Reason.INVALID_DESTINATION, detail=str(exc))
        literal = parse_ip(host)
        if literal is not None:
            decision = self._decide_address(literal, port, method, path)
            if (
                decision.permits
                and dest.address is not None
                and _plain(dest.address) != _plain(literal)
            ):
                # Connecting elsewhere than the literal names: that address must pass too.
                other = self._decide_address(dest.address, port, method, path)
                if not other.permits:
                    return other
            return decision
        return self._decide_named(host, dest.address, port, method, path, inspected=dest.inspected)

    def _deny_cidr_rule(
        self, address: IPAddress, port: int, method: str | None, path: str | None
    ) -> Rule | None:
        for rule in self._deny_cidr.lookup(address):
            if rule is not None and rule.deny_applies(port, method, path):
                return rule
        return None

    def _allow_cidr_rule(
        self, address: IPAddress, port: int, method: str | None, path: str | None
    ) -> tuple[Rule | None, Miss | None]:
        failure: Miss | None = None
        for rule in self._allow_cidr.lookup(address):
            if rule is None:
                continue
            why = rule.allow_failure(port, method, path)
            if why is None:
                return rule, None
            if why.closer_than(failure):
                failure = why
        return None, failure

    def _decide_named(
        self,
        host: str,
        address: IPAddress | None,
        port: int,
        method: str | None,
        path: str | None,
        *,
        inspected: bool = False,
    ) -> Decision:
        for rule in self._deny_hosts.lookup(host):
            if rule.deny_applies(port, method, path):
                return _deny(Reason.MATCHED_DENY, rule)
        if address is not None:
            denied = self._deny_cidr_rule(address, port, method, path)
            if denied is not None:
                return _deny(Reason.MATCHED_DENY, denied)

        allowed: Rule | None = None
        failure: Miss | None = None
        for rule in self._allow_hosts.lookup(host):
            why = rule.allow_failure(port, method, path, inspected)
            if why is None:
                allowed = rule
                break
            if why.closer_than(failure):
                failure = why
        by_name = (
            _allow(allowed)
            if allowed is not None
            else _missed(failure, f"no allow rule names {host}")
        )
        if address is None:
            return by_name

        cls = classify(address)
        if cls is not AddressClass.PUBLIC:
            cidr_rule, _ = self._allow_cidr_rule(address, port, method, path)
            if cidr_rule is not None:
                return _allow(cidr_rule)
            if self._private.contains(address):
                return by_name
            return _deny(Reason.PRIVATE_ADDRESS, detail=describe(address, cls))
        if allowed is not None:
            return by_name
        cidr_rule, cidr_failure = self._allow_cidr_rule(address, port, method, path)
        if cidr_rule is not None:
            return _allow(cidr_rule)
        if failure is None and cidr_failure is not None:
            return _missed(cidr_failure, "")
        return by_name

    def _decide_address(
        self, address: IPAddress, port: int, method: str | None, path: str | None
    ) -> Decision:
        denied = self._deny_cidr_rule(address, port, method, path)
        if denied is not None:
            return _deny(Reason.MATCHED_DENY, denied)
        rule, failure = self._allow_cidr_rule(address, port, method, path)
        if rule is not None:
            return _allow(rule)
        cls = classify(address)
        if cls is not AddressClass.PUBLIC and not self._private.contains(address):
            return _deny(Reason.PRIVATE_ADDRESS, detail=describe(address, cls))
        return _missed(failure, f"no allow rule matches {address}")

    # -- names alone (the DNS listener: sidecar.policy.dns) ------------------------------------

    def decide_name(self, host: str) -> Decision:
        """Whether any call to ``host`` could be allowed, by name alone (``host`` normalized).

        A deny rule that applies to every port and request (no ports, methods or paths) denies
        the name; any allow rule naming the host allows it, whatever its ports; else no rule
        matches. cidr rules do not make a name resolvable: they allow addresses, not names.
        """
        for rule in self._deny_hosts.lookup(host):
            if rule.ports is None and rule.methods is None and rule.paths is None:
                return _deny(Reason.MATCHED_DENY, rule)
        for rule in self._allow_hosts.lookup(host):
            return _allow(rule)
        return _deny(Reason.NO_MATCH, detail=f"no allow rule names {host}")

    def inspection(self, host: str, port: int) -> Rule | None:
        """The ``inspect: true`` rule that makes HTTPS to ``host:port`` inspected, if any.

        The most specific host pattern naming ``host`` with an allow rule that takes ``port``
        decides (exact before wildcards, the longest suffix first): ``api.example.com`` written
        without ``inspect`` stays passthrough under an inspected ``*.example.com``. Among that
        pattern's rules one that says ``inspect: true`` is enough. ``host`` is normalized here;
        an address or an invalid host is never inspected (a leaf certificate needs a name).
        """
        if not self._inspects:
            return None
        try:
            name = normalize_host(host)
        except InvalidHost:
            return None
        if parse_ip(name) is not None:
            return None
        pattern: tuple[str | None, bool] | None = None
        found: Rule | None = None
        for rule in self._allow_hosts.lookup(name):
            if port not in rule.allow_ports():
                continue
            if pattern is None:
                pattern = (rule.host, rule.wildcard)
            elif pattern != (rule.host, rule.wildcard):
                break
            if rule.inspect and found is None:
                found = rule
        return found

    def stream_host_rule(self, host: str, port: int) -> Rule | None:
        """A host allow rule that names explicit ``ports`` including ``port`` and no L7
        conditions: the only kind that allows raw TCP to an address learned for ``host``."""
        for rule in self._allow_hosts.lookup(host):
            if (
                rule.ports is not None
                and port in rule.ports
                and rule.methods is None
                and rule.paths is None
            ):
                return rule
        return None

    def guard_permits(self, address: IPAddress) -> bool:
        """The address guard lets ``address`` through for some port: it is public, in
        privateRanges, or a cidr allow rule covers it (which then decides each call)."""
        if classify(address) is AddressClass.PUBLIC or self._private.contains(address):
            return True
        return any(rule is not None for rule in self._allow_cidr.lookup(address))

    def needs_address(self, dest: Destination, by_name: Decision) -> bool:
        """Whether resolving ``dest.host`` could change or confirm ``by_name``.

        True when the by-name decision permits (the resolved address must be vetted by the
        guard) or when nothing matched by name but a cidr allow rule could match on this port.
        False for a by-name deny rule or an invalid destination. For an IP-literal host (in any
        spelling a resolver accepts, e.g. ``127.1``) the by-name decision already vetted the
        address: True only when it permits, so the caller finds the address to dial.
        ``dest.address`` is not consulted: a transparent flow that knows its original
        destination may still resolve the SNI name to dial a vetted address instead.
        """
        if by_name.reason in (Reason.MATCHED_DENY, Reason.INVALID_DESTINATION):
            return False
        if dest.host is None:
            return False
        try:
            host = normalize_host(dest.host)
        except InvalidHost:
            return False
        if parse_ip(host) is not None:
            # The literal was already decided as an address; resolving it (it may be spelled
            # "127.1" or "0x7f.1") only yields the address to dial, which decide() already vetted.
            return by_name.permits
        if by_name.permits:
            return True
        # A cidr rule may still allow the address, also where a host rule's L7 conditions
        # could not be seen.
        return (
            by_name.reason in (Reason.NO_MATCH, Reason.L7_NOT_VISIBLE)
            and dest.port in self._cidr_allow_ports
        )


def combine(policies: Sequence[Policy], *, source: str | None = None) -> Policy:
    """The union of several allowlists (the annotation's comma-separated ConfigMaps).

    Every allow rule of every policy allows, a deny rule of any policy denies, privateRanges are
    united. The mode is enforce if any document says enforce, audit only if every document that
    sets a mode says audit.
    """
    modes = [p.meta.mode for p in policies if p.meta.mode is not None]
    mode: Mode | None = None
    if Mode.ENFORCE in modes:
        mode = Mode.ENFORCE
    elif modes:
        mode = Mode.AUDIT
    meta = PolicyMeta(
        source=source if source is not None else ",".join(p.meta.source for p in policies),
        version=",".join(p.meta.version for p in policies),
        mode=mode,
    )
    return Policy(
        meta,
        [rule for p in policies for rule in p.allow_rules],
        [rule for p in policies for rule in p.deny_rules],
        [network for p in policies for network in p.private_ranges],
    )
