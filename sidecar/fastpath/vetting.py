"""A destination decided, and the address to connect to found: the one that was checked.

Shared by both engines (the fast path and the mitmproxy addon): one reading of every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.memo import remember
from sidecar.policy.dns import LearnedAddresses, learned_stream
from sidecar.policy.errors import InvalidHost
from sidecar.policy.hosts import normalize_host
from sidecar.policy.model import Decision, Destination, IPAddress, Mode, Reason, Verdict
from sidecar.policy.store import Snapshot, apply_mode
from sidecar.proxy.hostnames import address_of
from sidecar.proxy.resolver import Resolution, Resolver
from sidecar.record import DecisionRecord
from sidecar.wire.first_flight import FirstFlight, Flight


@dataclass(frozen=True, slots=True)
class Vetted:
    """A decision (mode applied) and the address to connect to when it permits; ``host``: the
    name a raw stream was decided by, when a learned address stood for it."""

    decision: Decision
    address: IPAddress | None
    host: str | None = None
    # The address as text, once: str() of an ipaddress costs ~3 us, and a memoized Vetted
    # serves many requests.
    peer: str | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peer", str(self.address) if self.address is not None else None)


# "GET https://..." to the proxy would make it originate TLS itself: HTTPS goes through CONNECT,
# end to end, or not at all.
HTTPS_TARGET = Vetted(
    Decision(
        Verdict.DENY,
        Reason.INVALID_DESTINATION,
        detail="an https:// request-target: send HTTPS through CONNECT",
    ),
    None,
)


# Readings kept per snapshot (Snapshot.memo) before the memo starts over: a pod calls a few
# destinations again and again, and deciding one afresh costs as much as the rest of a request.
MEMO_LIMIT = 4096
# Longer hosts and paths (up to the head limits' 8-16 KiB) are decided each time: kept, 4,096
# of them would hold tens of MiB of the app's choosing.
MEMO_KEY_CHARS = 1024


class _Lookup:
    """A destination whose decision needs its name resolved: the by-name reading, and the last
    answer it was decided against (the resolver hands out the same answer until it expires)."""

    __slots__ = ("audited", "by_name", "host", "resolution", "vetted")

    def __init__(self, host: str, by_name: Decision, audited: bool) -> None:
        self.host = host
        self.by_name = by_name
        self.audited = audited
        self.resolution: Resolution | None = None
        self.vetted: Vetted | None = None

    def resolved(self, snap: Snapshot, dest: Destination, resolution: Resolution) -> Vetted:
        # Identity, not equality: the entry holds the answer, so its id cannot be reused.
        if resolution is self.resolution and self.vetted is not None:
            return self.vetted
        vetted = _resolved(snap, dest, self.by_name, self.audited, resolution)
        self.resolution, self.vetted = resolution, vetted
        return vetted


def _first(snap: Snapshot, dest: Destination) -> Vetted | _Lookup:
    """``_without_lookup``, read once per snapshot and destination (never with learned
    addresses: those change with every DNS answer)."""
    memo = snap.memo
    key = (dest.host, dest.port, dest.address, dest.method, dest.path, dest.inspected)
    entry = memo.get(key)
    if entry is None:
        entry = _without_lookup(snap, dest)
        if len(dest.host or "") + len(dest.path or "") <= MEMO_KEY_CHARS:
            remember(memo, key, entry, MEMO_LIMIT)
    return entry  # type: ignore[return-value]  # only this module writes the memo


def address_vetted(
    snap: Snapshot, address: IPAddress | None, port: int, learned: LearnedAddresses | None
) -> Vetted:
    """A raw stream (no name seen) to ``address``: by the cidr rules, else by a name the pod's
    DNS answers gave it (a host rule with explicit ports: sidecar.policy.dns)."""
    raw = snap.decide_raw(Destination(None, port, address))
    if not raw.permits:
        granted = learned_stream(snap, learned, address, port)
        if granted is not None:
            return Vetted(granted[0], address, granted[1])
    return Vetted(apply_mode(raw, snap.mode), address)


def _without_lookup(
    snap: Snapshot, dest: Destination, learned: LearnedAddresses | None = None
) -> Vetted | _Lookup:
    """``dest`` decided where no name has to be resolved (a literal, or a decision that needs no
    address); else the name to resolve, its decision by name and whether audit lets it pass.
    ``learned``: a transparent raw stream, which addresses learned from DNS may allow."""
    literal = address_of(dest.host) if dest.host is not None else None
    if dest.host is None and learned is not None and dest.method is None:
        return address_vetted(snap, dest.address, dest.port, learned)
    if dest.host is None or literal is not None:
        address = dest.address or literal
        raw = snap.decide_raw(Destination(None, dest.port, address, dest.method, dest.path))
        return Vetted(apply_mode(raw, snap.mode), address)
    by_name = snap.decide_raw(dest)
    audited = by_name.verdict is Verdict.DENY and apply_mode(by_name, snap.mode).permits
    if not (snap.needs_address(dest, by_name) or audited):
        return Vetted(apply_mode(by_name, snap.mode), None)
    return _Lookup(dest.host, by_name, audited)


async def vet(
    resolver: Resolver,
    snap: Snapshot,
    dest: Destination,
    *,
    learned: LearnedAddresses | None = None,
) -> Vetted:
    """Decide ``dest`` and find the address to connect to (the one that was checked);
    ``learned`` for a transparent raw stream (``address_vetted``)."""
    first = _first(snap, dest) if learned is None else _without_lookup(snap, dest, learned)
    if isinstance(first, Vetted):
        return first
    return first.resolved(snap, dest, await resolver.resolve(first.host, dest.port))


def _resolved(
    snap: Snapshot, dest: Destination, by_name: Decision, audited: bool, resolution: Resolution
) -> Vetted:
    if not resolution.addresses:
        if by_name.permits or audited:
            # Allowed by name, but nowhere to connect: fail closed, say why.
            raw = Decision(Verdict.DENY, Reason.UNRESOLVABLE, by_name.rule, resolution.error)
            return Vetted(raw, None)
        return Vetted(apply_mode(by_name, snap.mode), None)
    raw, address = snap.decide_resolved(dest, resolution.addresses)
    decision = apply_mode(raw, snap.mode)
    if decision.permits and address is None:
        address = resolution.addresses[0]  # audit: let it through to where it was going
    return Vetted(decision, address)


def vet_now(snap: Snapshot, dest: Destination, resolver: Resolver | None = None) -> Vetted | None:
    """``vet`` without waiting, where no name has to be resolved (a literal, a decision that
    needs no address, or a name whose answer ``resolver`` still has cached); None: ``vet`` must
    resolve. The same reading as ``vet``: the fast path decides most requests without a task."""
    first = _first(snap, dest)
    if isinstance(first, Vetted):
        return first
    if resolver is not None and (hit := resolver.cached(first.host)) is not None:
        return first.resolved(snap, dest, hit)
    return None


def without_ca(vetted: Vetted, rule: str | None, problem: str | None, mode: Mode) -> Vetted:
    """An inspected host while the inspection CA is not available: what would be let through
    is denied (fail closed: its requests could not be decided). Audit mode lets it through,
    uninspected, and says why; a decision that already denies stays as it is."""
    if not vetted.decision.permits:
        return vetted
    raw = Decision(Verdict.DENY, Reason.INSPECTION_CA_UNAVAILABLE, rule, problem)
    decision = apply_mode(raw, mode)
    return Vetted(decision, vetted.address if decision.permits else None, vetted.host)


def tunnel_denial(rec: DecisionRecord, flight: FirstFlight | None) -> Decision | None:
    """An allowed tunnel's first flight decided for good (None: it stays allowed; ``flight``
    None: the server spoke first). A ClientHello whose SNI names another host than the CONNECT
    is domain fronting (a CDN routes by SNI): ``sni mismatch``, as mode says (audit lets it
    pass); an unreadable one is refused whatever the mode, as a refused request head is. A
    CONNECT to an IP literal with an SNI naming a host is refused too: that name was never
    decided. No SNI, or not TLS: the CONNECT host decided."""
    if flight is not None and flight.kind is Flight.UNREADABLE:
        return Decision(
            Verdict.DENY, Reason.UNREADABLE_FIRST_FLIGHT, rec.decision.rule, flight.problem
        )
    if flight is not None and flight.sni is not None and not same_host(rec.host, flight.sni):
        mismatch = Decision(
            Verdict.DENY,
            Reason.SNI_MISMATCH,
            rec.decision.rule,
            f"ClientHello for {flight.sni} in a tunnel to {rec.host}",
        )
        return apply_mode(mismatch, Mode(rec.mode))
    return None


def stream_decision(
    snap: Snapshot,
    sni: str | None,
    address: IPAddress | None,
    port: int,
    *,
    inspected: bool = False,
) -> Decision:
    """A transparent stream to an address a cidr rule allows, decided without a lookup: by that
    address, with the SNI (when there is one) against every rule, so a name deny rule wins over
    the cidr allow while any other name may go to the address the client dialled."""
    dest = Destination(sni, port, address, inspected=inspected)
    return apply_mode(snap.decide_raw(dest), snap.mode)


def held_vetted(
    snap: Snapshot,
    sni: str | None,
    address: IPAddress | None,
    port: int,
    learned: LearnedAddresses | None,
) -> Vetted:
    """A held stream decided on its first flight: by its SNI (``stream_decision``), or, when it
    showed none, as a raw stream (``address_vetted``: a learned address may allow it)."""
    if sni is None:
        return address_vetted(snap, address, port, learned)
    return Vetted(stream_decision(snap, sni, address, port), address)


def address_allows(
    snap: Snapshot,
    address: IPAddress | None,
    port: int,
    learned: LearnedAddresses | None = None,
) -> bool:
    """A cidr rule allows ``address`` itself, or a host rule by a name the pod learned for it
    (the raw decision: audit mode lets everything through, yet names should still be seen and
    decided): the upstream may be opened before the client speaks."""
    if address is None:
        return False
    if snap.decide_raw(Destination(None, port, address)).permits:
        return True
    return learned_stream(snap, learned, address, port) is not None


def same_host(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return normalize_host(a) == normalize_host(b)
    except InvalidHost:
        return False
