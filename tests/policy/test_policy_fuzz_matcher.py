"""The matcher under fuzzing: any policy the parser accepts decides any destination, never
raising, and every decision carries a reason."""

from __future__ import annotations

import ipaddress

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.policy.errors import AllowlistError
from sidecar.policy.model import Destination, Verdict
from sidecar.policy.parse import parse_allowlist

NAME = st.one_of(
    st.from_regex(r"(\*\.)?[a-z0-9_-]{1,8}(\.[a-z0-9-]{1,8}){0,3}", fullmatch=True),
    st.sampled_from(["*.com", "a.test:8080", "10.0.0.0/8", "::1", "[::1]:443", "bücher.test"]),
)
RULE = st.one_of(
    NAME,
    st.fixed_dictionaries(
        {"host": NAME},
        optional={
            "ports": st.lists(st.integers(0, 70000), max_size=3),
            "methods": st.lists(st.sampled_from(["GET", "post", "B@D"]), max_size=2),
            "paths": st.lists(st.from_regex(r"/[a-z*/%?]{0,8}", fullmatch=True), max_size=2),
            "broad": st.booleans(),
        },
    ),
    st.fixed_dictionaries(
        {"cidr": st.sampled_from(["10.0.0.0/8", "0.0.0.0/0", "fd00::/8", "1.2.3.4/32", "x"])},
        optional={"ports": st.lists(st.integers(1, 65535), max_size=2), "broad": st.booleans()},
    ),
)
ADDRESS = st.one_of(st.none(), st.ip_addresses())
HOST = st.one_of(st.none(), st.text(max_size=40), NAME)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(RULE, max_size=6),
    st.lists(RULE, max_size=3),
    st.lists(st.tuples(HOST, st.integers(1, 65535), ADDRESS, st.text(max_size=10)), max_size=6),
)
def test_any_accepted_policy_decides_any_destination(
    allow: list[object],
    deny: list[object],
    destinations: list[tuple[str | None, int, object, str]],
) -> None:
    try:
        policy = parse_allowlist(yaml.safe_dump({"allow": allow, "deny": deny}), source="f")
    except AllowlistError:
        return
    for host, port, address, path in destinations:
        assert address is None or isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
        decision = policy.decide(Destination(host, port, address, "GET", "/" + path))
        assert decision.verdict in (Verdict.ALLOW, Verdict.DENY)
        assert decision.reason
