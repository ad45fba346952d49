"""The private-address guard's classification table, including IPv4 embedded in IPv6."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.addresses import AddressClass, classify, describe, is_public

C = AddressClass


def _teredo(server: str, client: str) -> str:
    """A Teredo address: 2001:0:<server>:<flags>:<port^ffff>:<client^ffffffff>."""
    s = int(ipaddress.IPv4Address(server))
    c = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    value = (0x20010000 << 96) | (s << 64) | (0x8000 << 48) | (0x63BF << 32) | c
    return str(ipaddress.IPv6Address(value))


def _nat64_local(v4: str, prefix_len: int) -> str:
    """An address in 64:ff9b:1::/48 laid out per RFC 6052 for the given prefix length."""
    v = int(ipaddress.IPv4Address(v4))
    base = int(ipaddress.IPv6Address("64:ff9b:1::"))
    if prefix_len == 96:
        return str(ipaddress.IPv6Address(base | v))
    if prefix_len == 64:
        return str(ipaddress.IPv6Address(base | (v << 24)))
    if prefix_len == 56:
        return str(ipaddress.IPv6Address(base | ((v >> 24) << 64) | ((v & 0xFFFFFF) << 32)))
    if prefix_len == 48:
        return str(ipaddress.IPv6Address(base | ((v >> 16) << 64) | ((v & 0xFFFF) << 40)))
    raise AssertionError(prefix_len)


CASES: list[tuple[str, AddressClass]] = [
    # IPv4
    ("8.8.8.8", C.PUBLIC),
    ("1.1.1.1", C.PUBLIC),
    ("140.82.112.3", C.PUBLIC),
    ("0.0.0.0", C.UNSPECIFIED),
    ("0.1.2.3", C.RESERVED),  # "this network"
    ("10.0.0.1", C.PRIVATE),
    ("10.255.255.255", C.PRIVATE),
    ("172.16.0.1", C.PRIVATE),
    ("172.31.255.254", C.PRIVATE),
    ("172.32.0.1", C.PUBLIC),
    ("192.168.1.1", C.PRIVATE),
    ("127.0.0.1", C.LOOPBACK),
    ("127.255.0.9", C.LOOPBACK),
    ("169.254.0.1", C.LINK_LOCAL),
    ("169.254.169.254", C.METADATA),
    ("169.254.170.2", C.METADATA),
    ("100.100.100.200", C.METADATA),
    ("100.64.0.1", C.CGNAT),
    ("100.127.255.255", C.CGNAT),
    ("100.128.0.1", C.PUBLIC),
    ("224.0.0.1", C.MULTICAST),
    ("239.255.255.250", C.MULTICAST),
    ("240.0.0.1", C.RESERVED),
    ("255.255.255.255", C.RESERVED),
    ("192.0.0.8", C.RESERVED),
    ("192.0.0.9", C.PUBLIC),
    ("192.0.2.1", C.RESERVED),
    ("198.51.100.7", C.RESERVED),
    ("203.0.113.5", C.RESERVED),
    ("198.18.0.5", C.RESERVED),  # benchmarking: is_private says so, is_global disagrees
    ("198.19.255.255", C.RESERVED),
    ("198.20.0.1", C.PUBLIC),
    ("192.88.99.1", C.RESERVED),
    # IPv6
    ("2606:4700::1111", C.PUBLIC),
    ("2a00:1450:4001::200e", C.PUBLIC),
    ("::", C.UNSPECIFIED),
    ("::1", C.LOOPBACK),
    ("fe80::1", C.LINK_LOCAL),
    ("fe80::1%eth0", C.LINK_LOCAL),
    ("fc00::1", C.UNIQUE_LOCAL),
    ("fd12:3456::1", C.UNIQUE_LOCAL),
    ("fd00:ec2::254", C.METADATA),
    ("fec0::1", C.PRIVATE),
    ("ff02::1", C.MULTICAST),
    ("ff05::2", C.MULTICAST),
    ("2001:db8::1", C.RESERVED),
    ("3fff::1", C.RESERVED),
    ("100::1", C.RESERVED),
    ("2001:2::1", C.RESERVED),  # benchmarking
    ("2001:10::1", C.RESERVED),  # ORCHID (deprecated)
    ("2001:20::1", C.PUBLIC),  # ORCHIDv2
    ("2001:4:112::1", C.PUBLIC),
    ("5f00::1", C.RESERVED),
    ("4000::1", C.RESERVED),  # unallocated
    ("::ffff:0:0:1", C.RESERVED),  # SIIT-translated 0.0.0.1
    # IPv4-mapped
    ("::ffff:127.0.0.1", C.LOOPBACK),
    ("::ffff:10.1.2.3", C.PRIVATE),
    ("::ffff:169.254.169.254", C.METADATA),
    ("::ffff:8.8.8.8", C.PUBLIC),
    # IPv4-compatible (deprecated) and SIIT
    ("::127.0.0.1", C.LOOPBACK),
    ("::10.0.0.1", C.PRIVATE),
    ("::8.8.8.8", C.PUBLIC),
    ("::ffff:0:10.0.0.1", C.PRIVATE),
    # 6to4
    ("2002:0a00:0001::1", C.PRIVATE),  # 10.0.0.1
    ("2002:7f00:1::", C.LOOPBACK),
    ("2002:a9fe:a9fe::1", C.METADATA),
    ("2002:c612:5::1", C.RESERVED),  # 198.18.0.5
    ("2002:0808:0808::1", C.PUBLIC),
    # NAT64 well-known prefix
    ("64:ff9b::a9fe:a9fe", C.METADATA),  # 169.254.169.254
    ("64:ff9b::127.0.0.1", C.LOOPBACK),
    ("64:ff9b::10.0.0.1", C.PRIVATE),
    ("64:ff9b::100.64.0.1", C.CGNAT),
    ("64:ff9b::8.8.8.8", C.PUBLIC),
    # NAT64 local-use prefix, RFC 6052 layouts
    (_nat64_local("169.254.169.254", 96), C.METADATA),
    (_nat64_local("10.0.0.1", 64), C.PRIVATE),
    (_nat64_local("127.0.0.1", 56), C.LOOPBACK),
    (_nat64_local("192.168.0.1", 48), C.PRIVATE),
    (_nat64_local("8.8.8.8", 96), C.PUBLIC),
    # Teredo: the client address is xor-obfuscated
    (_teredo("65.54.227.120", "127.0.0.1"), C.LOOPBACK),
    (_teredo("65.54.227.120", "10.9.8.7"), C.PRIVATE),
    (_teredo("65.54.227.120", "169.254.169.254"), C.METADATA),
    (_teredo("65.54.227.120", "8.8.4.4"), C.PUBLIC),
    (_teredo("10.0.0.1", "8.8.4.4"), C.PRIVATE),  # a private Teredo server is not public either
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_classify(text: str, expected: AddressClass) -> None:
    address = ipaddress.ip_address(text)
    assert classify(address) is expected
    assert classify(text) is expected
    assert is_public(address) is (expected is C.PUBLIC)


def test_teredo_helper_matches_ipaddress() -> None:
    # The RFC 4380 example, checked against ipaddress's own decoding of the obfuscated client.
    address = ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    assert address.teredo == (
        ipaddress.IPv4Address("65.54.227.120"),
        ipaddress.IPv4Address("192.0.2.45"),
    )
    assert _teredo("65.54.227.120", "192.0.2.45") == str(address)
    assert classify(address) is C.RESERVED  # the client is in TEST-NET-1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", "10.0.0.1 is private"),
        ("198.18.0.5", "198.18.0.5 is reserved"),
        ("169.254.169.254", "169.254.169.254 is cloud metadata"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1 is loopback (embeds 127.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:a9fe is cloud metadata (embeds 169.254.169.254)"),
    ],
)
def test_describe(text: str, expected: str) -> None:
    address = ipaddress.ip_address(text)
    assert describe(address, classify(address)) == expected


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(st.ip_addresses(v=4))
def test_classify_v4_total_and_agrees_with_ipaddress_where_unambiguous(
    address: ipaddress.IPv4Address,
) -> None:
    cls = classify(address)
    assert isinstance(cls, AddressClass)
    # Where Python calls an address global we may still be stricter (metadata ...), never laxer.
    if cls is C.PUBLIC:
        assert address.is_global


# Global unicast, and the forms that carry an IPv4 address (mapped, compatible, SIIT, NAT64).
PUBLIC_CAN_BE_IN = (
    "2000::/3",
    "::ffff:0:0/96",
    "::/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
)


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(st.ip_addresses(v=6))
def test_classify_v6_total(address: ipaddress.IPv6Address) -> None:
    cls = classify(address)
    assert isinstance(cls, AddressClass)
    if cls is C.PUBLIC:
        assert any(address in ipaddress.ip_network(n) for n in PUBLIC_CAN_BE_IN)


@settings(deadline=None)  # no per-example deadline on a shared CI core
@given(st.ip_addresses(v=4))
def test_embedded_forms_classify_like_the_ipv4_address(address: ipaddress.IPv4Address) -> None:
    v = int(address)
    expected = classify(address)
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | v)
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | v)
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (v << 80) | 1)
    assert classify(mapped) is expected
    assert classify(nat64) is expected
    assert classify(sixtofour) is expected
    assert classify(_teredo("8.8.8.8", str(address))) is expected
