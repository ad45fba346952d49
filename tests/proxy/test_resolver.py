"""The resolver's cache and query sharing, with a stand-in for getaddrinfo (no DNS traffic)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from sidecar.proxy.resolver import Resolver


class FakeDns:
    def __init__(self, table: dict[str, list[str]], delay: float = 0.0) -> None:
        self.table = table
        self.delay = delay
        self.queries: list[str] = []

    async def __call__(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        self.queries.append(host)
        await asyncio.sleep(self.delay)
        addresses = self.table.get(host.lower())  # names are case-insensitive, as in DNS
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_concurrent_lookups_of_one_name_share_one_query() -> None:
    dns = FakeDns({"api.test": ["198.18.0.1"]}, delay=0.05)
    resolver = Resolver(getaddrinfo=dns)

    async def many() -> list[Any]:
        return await asyncio.gather(*(resolver.resolve("api.test", 443) for _ in range(20)))

    results = run(many())
    assert dns.queries == ["api.test"]
    assert {str(a) for r in results for a in r.addresses} == {"198.18.0.1"}


def test_answers_are_kept_for_the_ttl_then_asked_again() -> None:
    dns = FakeDns({"api.test": ["198.18.0.1", "fd00::1"]})
    resolver = Resolver(cache_ttl=0.2, getaddrinfo=dns)

    async def scenario() -> None:
        first = await resolver.resolve("API.test", 443)
        assert [str(a) for a in first.addresses] == ["198.18.0.1", "fd00::1"]
        await resolver.resolve("api.test", 80)
        assert dns.queries == ["API.test"]
        await asyncio.sleep(0.3)
        await resolver.resolve("api.test", 443)
        assert len(dns.queries) == 2

    run(scenario())


def test_failures_are_kept_only_for_the_negative_ttl() -> None:
    dns = FakeDns({})
    resolver = Resolver(cache_ttl=5, negative_ttl=0.1, getaddrinfo=dns)

    async def scenario() -> None:
        miss = await resolver.resolve("ghost.test", 443)
        assert miss.addresses == () and "ghost.test" in (miss.error or "")
        await resolver.resolve("ghost.test", 443)
        assert dns.queries == ["ghost.test"]
        await asyncio.sleep(0.15)
        await resolver.resolve("ghost.test", 443)
        assert dns.queries == ["ghost.test", "ghost.test"]

    run(scenario())


def test_a_zero_ttl_disables_the_cache() -> None:
    dns = FakeDns({"api.test": ["198.18.0.1"]})
    resolver = Resolver(cache_ttl=0, getaddrinfo=dns)

    async def scenario() -> None:
        for _ in range(3):
            await resolver.resolve("api.test", 443)

    run(scenario())
    assert len(dns.queries) == 3


def test_a_fully_qualified_name_falls_back_to_the_hosts_file_spelling() -> None:
    dns = FakeDns({"api.test": ["198.18.0.1"]})
    resolution = run(Resolver(getaddrinfo=dns).resolve("api.test.", 443))
    assert [str(a) for a in resolution.addresses] == ["198.18.0.1"]
    assert dns.queries == ["api.test.", "api.test"]


def test_a_caller_that_goes_away_does_not_cancel_the_shared_query() -> None:
    dns = FakeDns({"api.test": ["198.18.0.1"]}, delay=0.1)
    resolver = Resolver(getaddrinfo=dns)

    async def scenario() -> None:
        impatient = asyncio.ensure_future(resolver.resolve("api.test", 443))
        patient = asyncio.ensure_future(resolver.resolve("api.test", 443))
        await asyncio.sleep(0.01)
        impatient.cancel()
        result = await patient
        assert [str(a) for a in result.addresses] == ["198.18.0.1"]
        with pytest.raises(asyncio.CancelledError):
            await impatient

    run(scenario())
    assert dns.queries == ["api.test"]


def test_a_slow_resolver_times_out_with_a_reason() -> None:
    dns = FakeDns({"api.test": ["198.18.0.1"]}, delay=1.0)
    resolution = run(Resolver(timeout=0.05, getaddrinfo=dns).resolve("api.test", 443))
    assert resolution.addresses == ()
    assert "timed out" in (resolution.error or "")


# -- the fast path's synchronous decision on a cached answer (sidecar.fastpath.vetting) ---------

VET_CASES = [
    # (allowlist, host, port, DNS answers): a cached success, failure, guard refusal and audit
    ("allow: [api.test]", "api.test", 443, ["93.184.216.34"]),
    ("allow: [api.test]", "API.test", 443, ["93.184.216.34", "10.0.0.1"]),
    ("allow: [api.test]", "api.test", 443, ["10.0.0.1"]),  # private: refused by the guard
    ("allow: [api.test]", "gone.test", 443, None),  # not allowed: needs no address
    ("allow: [gone.test]", "gone.test", 443, None),  # allowed but does not resolve
    ("{mode: audit, allow: [other.test]}", "api.test", 80, ["93.184.216.34"]),
]


@pytest.mark.parametrize(("doc", "host", "port", "answers"), VET_CASES)
def test_vet_now_decides_a_cached_name_as_vet_does(
    doc: str, host: str, port: int, answers: list[str] | None
) -> None:
    from sidecar.fastpath.vetting import vet, vet_now
    from sidecar.policy.model import Destination
    from sidecar.policy.parse import parse_allowlist
    from sidecar.policy.store import PolicyStore

    snap = PolicyStore().set_policy(parse_allowlist(doc, source="test"))
    dns = FakeDns({host.lower(): answers} if answers is not None else {})
    resolver = Resolver(getaddrinfo=dns)
    dest = Destination(host, port)
    now = vet_now(snap, dest, resolver)
    needs_lookup = now is None
    waited = run(vet(resolver, snap, dest))
    if needs_lookup:
        # Not cached before: vet asked DNS; now the cached answer decides without waiting.
        assert dns.queries == [host]
        assert vet_now(snap, dest, resolver) == waited
    else:
        assert dns.queries == [] and now == waited  # decided by name alone: no lookup at all


def test_a_remembered_reading_follows_a_new_answer() -> None:
    """Snapshot.memo keeps a destination's reading, never its answer: once the cached answer
    expires and DNS says otherwise, the next call is decided on the new addresses."""
    from sidecar.fastpath.vetting import vet, vet_now
    from sidecar.policy.model import Destination, Reason, Verdict
    from sidecar.policy.parse import parse_allowlist
    from sidecar.policy.store import PolicyStore

    snap = PolicyStore().set_policy(parse_allowlist("allow: [api.test]", source="test"))
    dns = FakeDns({"api.test": ["93.184.216.34"]})
    resolver = Resolver(cache_ttl=0.1, getaddrinfo=dns)
    dest = Destination("api.test", 443)
    first = run(vet(resolver, snap, dest))
    assert first.decision.verdict is Verdict.ALLOW and first.peer == "93.184.216.34"
    assert vet_now(snap, dest, resolver) is first  # the same answer: the same reading
    dns.table["api.test"] = ["10.0.0.1"]  # rebinding to a private address
    run(asyncio.sleep(0.15))
    assert vet_now(snap, dest, resolver) is None  # expired: must be asked again
    second = run(vet(resolver, snap, dest))
    assert second.decision.reason is Reason.PRIVATE_ADDRESS and second.address is None


def test_a_new_policy_is_read_afresh_and_the_memo_is_bounded() -> None:
    from sidecar.fastpath.vetting import MEMO_LIMIT, vet_now
    from sidecar.policy.model import Destination, Verdict
    from sidecar.policy.parse import parse_allowlist
    from sidecar.policy.store import PolicyStore

    store = PolicyStore()
    old = store.set_policy(parse_allowlist("allow: [{cidr: 198.18.0.0/15}]", source="test"))
    dest = Destination("198.18.0.7", 80)
    allowed = vet_now(old, dest)
    assert allowed is not None and allowed.decision.verdict is Verdict.ALLOW
    new = store.set_policy(parse_allowlist("allow: [api.test]", source="test"))
    denied = vet_now(new, dest)
    assert denied is not None and denied.decision.verdict is Verdict.DENY
    assert vet_now(old, dest) is allowed  # a request decided with the old snapshot keeps it
    for n in range(MEMO_LIMIT + 10):
        vet_now(new, Destination(f"198.19.{n // 256}.{n % 256}", 80))
    assert 0 < len(new.memo) <= MEMO_LIMIT


def test_long_destinations_are_decided_each_time_not_kept() -> None:
    """A path or host of the app's choosing up to the head limits (8-16 KiB) is not memoized:
    4,096 of them would hold tens of MiB. The decision is the same either way."""
    from sidecar.fastpath.vetting import MEMO_KEY_CHARS, vet_now
    from sidecar.policy.model import Destination, Verdict
    from sidecar.policy.parse import parse_allowlist
    from sidecar.policy.store import PolicyStore

    snap = PolicyStore().set_policy(parse_allowlist("allow: [{cidr: 198.18.0.0/15}]", source="t"))
    host = "198.18.0.7"
    at_bound = Destination(host, 80, method="GET", path="/" * (MEMO_KEY_CHARS - len(host)))
    past = Destination(host, 80, method="GET", path="/" * (MEMO_KEY_CHARS - len(host) + 1))
    decided = [vet_now(snap, d) for d in (past, past, at_bound)]
    assert all(v is not None and v.decision.verdict is Verdict.ALLOW for v in decided)
    assert list(snap.memo) == [(host, 80, None, "GET", at_bound.path, False)]
    for n in range(50):
        vet_now(snap, Destination(host, 80, method="GET", path=f"/{n}" + "y" * 2000))
    assert len(snap.memo) == 1


def test_the_answer_cache_is_bounded_oldest_first() -> None:
    dns = FakeDns({f"n{i}.test": ["198.18.0.1"] for i in range(5)})
    resolver = Resolver(max_entries=3, getaddrinfo=dns)

    async def scenario() -> None:
        for i in range(5):
            await resolver.resolve(f"n{i}.test", 80)

    run(scenario())
    assert [resolver.cached(f"n{i}.test") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
