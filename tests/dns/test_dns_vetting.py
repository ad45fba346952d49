"""The vetting step both engines share, with learned addresses: a transparent raw stream to an
address the pod learned for a host named by an explicit-port rule is decided by that host."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from sidecar.fastpath.vetting import address_allows, address_vetted, held_vetted, vet, vet_now
from sidecar.policy.dns import LearnedAddresses
from sidecar.policy.model import Destination, IPAddress, Mode, Reason, Verdict
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore, Snapshot
from sidecar.proxy.resolver import Resolver

DOC = """\
allow:
  - host: mydb.example.com
    ports: [5432]
  - api.example.com
  - cidr: 8.8.4.0/24
    ports: [6379]
"""


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(mode: Mode | None = None) -> tuple[Snapshot, LearnedAddresses, Clock]:
    clock = Clock()
    learned = LearnedAddresses(clock=clock)
    learned.learn("mydb.example.com", [ip("8.8.8.8")], 30)
    learned.learn("api.example.com", [ip("8.8.8.9")], 30)
    snap = PolicyStore(mode).set_policy(parse_allowlist(DOC, source="test"))
    return snap, learned, clock


def test_learned_address_on_the_rules_port_is_allowed_and_names_the_host() -> None:
    snap, learned, _ = setup()
    vetted = address_vetted(snap, ip("8.8.8.8"), 5432, learned)
    assert (vetted.decision.verdict, vetted.decision.reason) == (
        Verdict.ALLOW,
        Reason.MATCHED_ALLOW,
    )
    assert vetted.decision.rule == "{host: mydb.example.com, ports: [5432]}"
    assert (vetted.host, vetted.address) == ("mydb.example.com", ip("8.8.8.8"))


@pytest.mark.parametrize(
    ("address", "port"),
    [
        ("8.8.8.8", 5433),  # another port
        ("8.8.8.9", 443),  # a default-ports rule: TLS/HTTP name their host themselves
        ("1.1.1.1", 5432),  # never learned
    ],
)
def test_other_ports_and_unknown_addresses_fall_back_to_the_cidr_rules(
    address: str, port: int
) -> None:
    snap, learned, _ = setup()
    vetted = address_vetted(snap, ip(address), port, learned)
    assert vetted.decision.verdict is Verdict.DENY and vetted.host is None
    assert not address_allows(snap, ip(address), port, learned)


def test_expired_falls_back_and_cidr_still_decides() -> None:
    snap, learned, clock = setup()
    assert address_allows(snap, ip("8.8.8.8"), 5432, learned)  # held: the server may speak first
    clock.now = 31
    assert address_vetted(snap, ip("8.8.8.8"), 5432, learned).decision.verdict is Verdict.DENY
    assert not address_allows(snap, ip("8.8.8.8"), 5432, learned)
    cidr = address_vetted(snap, ip("8.8.4.4"), 6379, learned)
    assert (cidr.decision.verdict, cidr.host) == (Verdict.ALLOW, None)


def test_audit_mode_a_learned_grant_is_an_allow_not_an_audit() -> None:
    snap, learned, _ = setup(Mode.AUDIT)
    assert address_vetted(snap, ip("8.8.8.8"), 5432, learned).decision.verdict is Verdict.ALLOW
    assert address_vetted(snap, ip("1.1.1.1"), 5432, learned).decision.verdict is Verdict.AUDIT


def test_held_stream_with_an_sni_is_decided_by_its_sni() -> None:
    snap, learned, _ = setup()
    by_sni = held_vetted(snap, "evil.test", ip("8.8.8.8"), 5432, learned)
    assert by_sni.decision.verdict is Verdict.DENY
    raw = held_vetted(snap, None, ip("8.8.8.8"), 5432, learned)
    assert (raw.decision.verdict, raw.host) == (Verdict.ALLOW, "mydb.example.com")


def test_vet_uses_learned_only_when_asked_and_never_for_http() -> None:
    snap, learned, _ = setup()
    resolver = Resolver(learned=learned)
    stream = Destination(None, 5432, ip("8.8.8.8"))
    got = asyncio.run(vet(resolver, snap, stream, learned=learned))
    assert (got.decision.verdict, got.host) == (Verdict.ALLOW, "mydb.example.com")
    # Without it (an explicit CONNECT to a literal, the explicit proxy): cidr rules only.
    assert asyncio.run(vet(resolver, snap, stream)).decision.verdict is Verdict.DENY
    http = Destination(None, 5432, ip("8.8.8.8"), "GET", "/")
    assert asyncio.run(vet(resolver, snap, http, learned=learned)).decision.verdict is Verdict.DENY
    now = vet_now(snap, stream, resolver)
    assert now is not None and now.decision.verdict is Verdict.DENY
