"""The private-address guard's classification of IP addresses.

Written as an explicit table rather than ``ipaddress``'s ``is_private``/``is_global``: those
change between Python releases, call 100.64.0.0/10 neither private nor global, do not look inside
6to4/NAT64/Teredo addresses, and say nothing about cloud metadata endpoints. IPv6 forms that
carry an IPv4 address (mapped, compatible, SIIT-translated, 6to4, NAT64, Teredo) are classified
by the IPv4 address they reach, so ``::ffff:127.0.0.1`` is loopback and ``64:ff9b::a9fe:a9fe``
is the metadata service.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum

from sidecar.policy.model import IPAddress


class AddressClass(StrEnum):
    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    CGNAT = "carrier-grade NAT"
    UNIQUE_LOCAL = "unique-local"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    RESERVED = "reserved"  # documentation, benchmarking, broadcast, "this network", unallocated
    METADATA = "cloud metadata"


def _v4(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def _v6(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


# Exact addresses first (most specific), then ranges; the first match wins.
_V4_TABLE: tuple[tuple[ipaddress.IPv4Network, AddressClass], ...] = (
    (_v4("169.254.169.254/32"), AddressClass.METADATA),  # AWS, GCP, Azure, OCI, DigitalOcean
    (_v4("169.254.170.2/32"), AddressClass.METADATA),  # AWS ECS task metadata
    (_v4("100.100.100.200/32"), AddressClass.METADATA),  # Alibaba Cloud
    (_v4("0.0.0.0/32"), AddressClass.UNSPECIFIED),
    (_v4("255.255.255.255/32"), AddressClass.RESERVED),  # limited broadcast
    (_v4("192.0.0.9/32"), AddressClass.PUBLIC),  # PCP anycast (IANA: globally reachable)
    (_v4("192.0.0.10/32"), AddressClass.PUBLIC),  # TURN anycast (IANA: globally reachable)
    (_v4("0.0.0.0/8"), AddressClass.RESERVED),  # "this network"
    (_v4("10.0.0.0/8"), AddressClass.PRIVATE),
    (_v4("100.64.0.0/10"), AddressClass.CGNAT),
    (_v4("127.0.0.0/8"), AddressClass.LOOPBACK),
    (_v4("169.254.0.0/16"), AddressClass.LINK_LOCAL),
    (_v4("172.16.0.0/12"), AddressClass.PRIVATE),
    (_v4("192.0.0.0/24"), AddressClass.RESERVED),  # IETF protocol assignments
    (_v4("192.0.2.0/24"), AddressClass.RESERVED),  # TEST-NET-1
    (_v4("192.88.99.0/24"), AddressClass.RESERVED),  # 6to4 relay anycast (deprecated)
    (_v4("192.168.0.0/16"), AddressClass.PRIVATE),
    (_v4("198.18.0.0/15"), AddressClass.RESERVED),  # benchmarking
    (_v4("198.51.100.0/24"), AddressClass.RESERVED),  # TEST-NET-2
    (_v4("203.0.113.0/24"), AddressClass.RESERVED),  # TEST-NET-3
    (_v4("224.0.0.0/4"), AddressClass.MULTICAST),
    (_v4("240.0.0.0/4"), AddressClass.RESERVED),  # future use
)

_V6_TABLE: tuple[tuple[ipaddress.IPv6Network, AddressClass], ...] = (
    (_v6("fd00:ec2::254/128"), AddressClass.METADATA),  # AWS IMDS over IPv6
    (_v6("::/128"), AddressClass.UNSPECIFIED),
    (_v6("::1/128"), AddressClass.LOOPBACK),
    (_v6("100::/64"), AddressClass.RESERVED),  # discard-only
    (_v6("2001:1::1/128"), AddressClass.PUBLIC),  # PCP anycast
    (_v6("2001:1::2/128"), AddressClass.PUBLIC),  # TURN anycast
    (_v6("2001:3::/32"), AddressClass.PUBLIC),  # AMT
    (_v6("2001:4:112::/48"), AddressClass.PUBLIC),  # AS112-v6
    (_v6("2001:20::/28"), AddressClass.PUBLIC),  # ORCHIDv2
    (_v6("2001:30::/28"), AddressClass.PUBLIC),  # drone remote ID
    (_v6("2001::/23"), AddressClass.RESERVED),  # rest of IETF protocol assignments (benchmark..)
    (_v6("2001:db8::/32"), AddressClass.RESERVED),  # documentation
    (_v6("3fff::/20"), AddressClass.RESERVED),  # documentation (RFC 9637)
    (_v6("5f00::/16"), AddressClass.RESERVED),  # SRv6 SIDs
    (_v6("2000::/3"), AddressClass.PUBLIC),  # global unicast
    (_v6("fc00::/7"), AddressClass.UNIQUE_LOCAL),
    (_v6("fe80::/10"), AddressClass.LINK_LOCAL),
    (_v6("fec0::/10"), AddressClass.PRIVATE),  # site-local (deprecated, still routed privately)
    (_v6("ff00::/8"), AddressClass.MULTICAST),
    (_v6("::/0"), AddressClass.RESERVED),  # everything else is unallocated or special
)

# IPv6 ranges that embed an IPv4 address; how to get it out is in _embedded_v4.
_MAPPED = _v6("::ffff:0:0/96")
_COMPATIBLE = _v6("::/96")
_TRANSLATED = _v6("::ffff:0:0:0/96")  # SIIT, RFC 2765
_SIX_TO_FOUR = _v6("2002::/16")
_NAT64 = _v6("64:ff9b::/96")
_NAT64_LOCAL = _v6("64:ff9b:1::/48")
_TEREDO = _v6("2001::/32")

# How restrictive a class is, to pick one when an address could mean several IPv4 addresses.
_PRECEDENCE = {
    AddressClass.PUBLIC: 0,
    AddressClass.RESERVED: 1,
    AddressClass.MULTICAST: 2,
    AddressClass.CGNAT: 3,
    AddressClass.UNIQUE_LOCAL: 4,
    AddressClass.PRIVATE: 5,
    AddressClass.LINK_LOCAL: 6,
    AddressClass.UNSPECIFIED: 7,
    AddressClass.LOOPBACK: 8,
    AddressClass.METADATA: 9,
}


def _masks(
    table: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, AddressClass], ...],
) -> tuple[tuple[int, int, AddressClass], ...]:
    # (mask, network, class) as ints: a membership test is one AND and one compare.
    return tuple((int(n.netmask), int(n.network_address), cls) for n, cls in table)


_V4_MASKS = _masks(_V4_TABLE)
_V6_MASKS = _masks(_V6_TABLE)


def _classify_v4(address: ipaddress.IPv4Address) -> AddressClass:
    value = int(address)
    for mask, network, cls in _V4_MASKS:
        if value & mask == network:
            return cls
    return AddressClass.PUBLIC


def _rfc6052_candidates(value: int) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a 64:ff9b:1::/48 address may carry (RFC 6052 prefix lengths 48..96).

    The operator's prefix length is not visible in the address, so every layout whose reserved
    bits (the "u" octet, bits 64-71, and the suffix) are zero is a candidate.
    """

    def bits(start: int, length: int) -> int:
        return (value >> (128 - start - length)) & ((1 << length) - 1)

    candidates = [ipaddress.IPv4Address(bits(96, 32))]  # /96
    if bits(64, 8) == 0:
        if bits(104, 24) == 0:  # /64: v4 in bits 72-103
            candidates.append(ipaddress.IPv4Address(bits(72, 32)))
        if bits(96, 32) == 0:  # /56: 8 bits at 56-63, 24 bits at 72-95
            candidates.append(ipaddress.IPv4Address((bits(56, 8) << 24) | bits(72, 24)))
        if bits(88, 40) == 0:  # /48: 16 bits at 48-63, 16 bits at 72-87
            candidates.append(ipaddress.IPv4Address((bits(48, 16) << 16) | bits(72, 16)))
    # A layout that reads 0.0.0.0 is the wrong guess when another layout fits (the zero bits are
    # its suffix); keep it only when nothing else fits, and it then classifies as unspecified.
    meaningful = [c for c in candidates if int(c) != 0]
    return meaningful or candidates[:1]


def _embedded_v4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 address(es) an IPv6 address reaches, or None when it embeds none."""
    value = int(address)
    low32 = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address in _MAPPED or address in _TRANSLATED:
        return [low32]
    if address in _COMPATIBLE:
        return [low32] if value > 1 else None  # :: and ::1 are themselves
    if address in _NAT64:
        return [low32]
    if address in _NAT64_LOCAL:
        return _rfc6052_candidates(value)
    if address in _SIX_TO_FOUR:
        return [ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF)]
    if address in _TEREDO:
        server = ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address(~value & 0xFFFFFFFF)  # the client address is xor-obfuscated
        return [client, server]
    return None


def classify(address: IPAddress | str) -> AddressClass:
    """The guard's class of ``address``; never raises for a valid IPv4/IPv6 address."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    if isinstance(address, ipaddress.IPv4Address):
        return _classify_v4(address)
    plain = ipaddress.IPv6Address(int(address))  # drop any %scope
    embedded = _embedded_v4(plain)
    if embedded is not None:
        return max((_classify_v4(v4) for v4 in embedded), key=_PRECEDENCE.__getitem__)
    value = int(plain)
    for mask, network, cls in _V6_MASKS:
        if value & mask == network:
            return cls
    return AddressClass.RESERVED  # unreachable: ::/0 is the table's last row


def is_public(address: IPAddress | str) -> bool:
    return classify(address) is AddressClass.PUBLIC


def describe(address: IPAddress, cls: AddressClass) -> str:
    """Human detail for a guard denial, e.g. ``10.0.0.1 is private``."""
    plain = ipaddress.IPv6Address(int(address)) if address.version == 6 else address
    embedded = _embedded_v4(plain) if isinstance(plain, ipaddress.IPv6Address) else None
    if embedded:
        worst = max(embedded, key=lambda v4: _PRECEDENCE[_classify_v4(v4)])
        return f"{address} is {cls} (embeds {worst})"
    return f"{address} is {cls}"
