"""The pure rules generator: option parsing, rendering, iptables-save parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.contract import PROXY_UID, TRANSPARENT_PORT
from sidecar.iptables import rules
from sidecar.iptables.rules import (
    CaptureOptions,
    Family,
    PortRange,
    RuleOptionError,
    SaveParseError,
    TableState,
)

# --- option parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("80", (PortRange(80, 80),)),
        ("443, 80", (PortRange(80, 80), PortRange(443, 443))),
        ("8000-8080", (PortRange(8000, 8080),)),
        ("8000:8080", (PortRange(8000, 8080),)),
        ("80,80,,80", (PortRange(80, 80),)),
        ("1,65535", (PortRange(1, 1), PortRange(65535, 65535))),
    ],
)
def test_parse_ports(text: str, expected: tuple[PortRange, ...]) -> None:
    assert rules.parse_ports(text) == expected


@pytest.mark.parametrize("text", ["0", "65536", "x", "80-", "-80", "90-80", "1.5", "80-90-100"])
def test_parse_ports_rejects_and_names_the_item(text: str) -> None:
    with pytest.raises(RuleOptionError, match="--exclude-outbound-ports"):
        rules.parse_ports(text)


def test_star_means_all_only_where_allowed() -> None:
    assert rules.parse_ports("*", allow_all=True) == ()
    with pytest.raises(RuleOptionError, match="'\\*'"):
        rules.parse_ports("*")


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=20))
def test_parse_ports_roundtrips_any_port_list(ports: list[int]) -> None:
    parsed = rules.parse_ports(",".join(map(str, ports)))
    assert [r.first for r in parsed] == sorted(set(ports))
    assert all(r.first == r.last for r in parsed)


@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 65535))
def test_port_range_contains(a: int, b: int, port: int) -> None:
    lo, hi = sorted((a, b))
    assert PortRange(lo, hi).contains(port) == (lo <= port <= hi)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("10.1.2.3/8", ["10.0.0.0/8"]),  # host bits cleared, as iptables-save shows it
        ("10.0.0.1", ["10.0.0.1/32"]),
        ("fd00::/8, 10.0.0.0/8,10.0.0.0/8", ["10.0.0.0/8", "fd00::/8"]),
        ("::1", ["::1/128"]),
    ],
)
def test_parse_cidrs(text: str, expected: list[str]) -> None:
    assert [str(n) for n in rules.parse_cidrs(text)] == expected


@pytest.mark.parametrize("text", ["10.0.0.0/33", "example.com", "10.0.0", "fd00::/129"])
def test_parse_cidrs_rejects_and_names_the_item(text: str) -> None:
    with pytest.raises(RuleOptionError, match=f"--exclude-outbound-cidrs: '{text}'"):
        rules.parse_cidrs(text)


@given(st.ip_addresses(), st.integers(0, 128))
def test_parse_cidrs_accepts_any_valid_network(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, plen: int
) -> None:
    plen = min(plen, addr.max_prefixlen)
    (net,) = rules.parse_cidrs(f"{addr}/{plen}")
    assert addr in net and net.prefixlen == plen


@pytest.mark.parametrize(
    "kwargs", [{"proxy_uid": -1}, {"proxy_gid": 2**32}, {"proxy_port": 0}, {"proxy_port": 70000}]
)
def test_capture_options_validate(kwargs: dict[str, int]) -> None:
    with pytest.raises(RuleOptionError):
        CaptureOptions(**kwargs)  # type: ignore[arg-type]


def test_defaults_come_from_the_contract() -> None:
    opts = CaptureOptions()
    assert (opts.proxy_uid, opts.proxy_port, opts.proxy_gid) == (PROXY_UID, TRANSPARENT_PORT, None)
    assert opts.exclude_cidrs == ()  # no cluster ranges by default: the injector passes them


# --- rendering ------------------------------------------------------------------------------


def _chain_rules(opts: CaptureOptions, family: Family, table: str) -> list[str]:
    for t in rules.desired_tables(opts, family):
        if t.table == table:
            return list(t.rules)
    return []


def test_nat_rules_order_default_ipv4() -> None:
    assert _chain_rules(CaptureOptions(), Family.IPV4, "nat") == [
        "-m owner --uid-owner 1337 -j RETURN",
        "-o lo -j RETURN",
        "-d 127.0.0.0/8 -j RETURN",
        "-p tcp -j REDIRECT --to-ports 15002",
    ]


def test_exclusions_come_before_the_redirect_and_split_by_family() -> None:
    opts = CaptureOptions(
        exclude_cidrs=rules.parse_cidrs("10.96.0.0/12,fd00:10::/64"),
        exclude_ports=rules.parse_ports("22"),
        include_ports=rules.parse_ports("22,80", allow_all=True),
    )
    v4 = _chain_rules(opts, Family.IPV4, "nat")
    v6 = _chain_rules(opts, Family.IPV6, "nat")
    assert "-d 10.96.0.0/12 -j RETURN" in v4 and not any("fd00" in r for r in v4)
    assert "-d fd00:10::/64 -j RETURN" in v6 and not any("10.96" in r for r in v6)
    assert "-d ::1/128 -j RETURN" in v6
    for chain in (v4, v6):
        assert chain.index("-p tcp -m tcp --dport 22 -j RETURN") < chain.index(
            "-p tcp -m tcp --dport 22 -j REDIRECT --to-ports 15002"
        )
        assert chain[-1] == "-p tcp -m tcp --dport 80 -j REDIRECT --to-ports 15002"
        assert "-p tcp -j REDIRECT --to-ports 15002" not in chain


def test_filter_table_is_always_there() -> None:
    """UDP and ICMP echo are restricted whatever TCP capture covers (the QUIC reject used to
    vanish with port 443 excluded or not included, and with it all UDP was free)."""
    for opts in (
        CaptureOptions(exclude_ports=rules.parse_ports("400-500")),
        CaptureOptions(include_ports=rules.parse_ports("80")),
        CaptureOptions(quic_reject=False),
    ):
        for fam in Family:
            assert [t.table for t in rules.desired_tables(opts, fam)] == ["nat", "filter"]


def _filter(opts: CaptureOptions, family: Family) -> rules.TableRules:
    (t,) = [t for t in rules.desired_tables(opts, family) if t.table == "filter"]
    return t


def test_filter_rules_default_ipv4() -> None:
    opts = CaptureOptions(proxy_gid=1337, exclude_cidrs=rules.parse_cidrs("10.0.0.0/8"))
    t = _filter(opts, Family.IPV4)
    assert t.jumps == ("! -p tcp -j EGRESS_SIDECAR_OUTPUT",)
    assert list(t.rules) == [
        "-m owner --uid-owner 1337 -j RETURN",
        "-m owner --gid-owner 1337 -j RETURN",
        "-o lo -j RETURN",
        "-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
        "-d 10.0.0.0/8 -j RETURN",
        "-p udp -m udp --dport 53 -g EGRESS_SIDECAR_DNS",
        "-p udp -j REJECT --reject-with icmp-port-unreachable",
        "-p icmp -m icmp --icmp-type 8 -j REJECT --reject-with icmp-admin-prohibited",
        "-p icmp -m conntrack --ctstate RELATED -j RETURN",
        "-d 224.0.0.0/4 -p igmp -j RETURN",
        "-j REJECT --reject-with icmp-admin-prohibited",
    ]
    assert dict(t.chains)["EGRESS_SIDECAR_DNS"] == (
        "-j REJECT --reject-with icmp-port-unreachable",
    )


def test_filter_rules_ipv6_never_touch_neighbour_discovery() -> None:
    t = _filter(CaptureOptions(), Family.IPV6)
    # NS/NA/RS/RA/redirect and MLD return (conntrack does not track them), errors about a
    # tracked flow too; every other ICMPv6 message is refused.
    assert t.jumps == ("! -p tcp -j EGRESS_SIDECAR_OUTPUT",)
    untracked = (130, 131, 132, 133, 134, 135, 136, 137, 143)
    assert t.rules[-13:] == (
        "-p udp -j REJECT --reject-with icmp6-port-unreachable",
        "-p ipv6-icmp -m icmp6 --icmpv6-type 128 -j REJECT --reject-with icmp6-adm-prohibited",
        "-p ipv6-icmp -m conntrack --ctstate RELATED -j RETURN",
        *(f"-p ipv6-icmp -m icmp6 --icmpv6-type {n} -j RETURN" for n in untracked),
        "-j REJECT --reject-with icmp6-adm-prohibited",
    )


@pytest.mark.parametrize(
    ("opts", "family", "returns"),
    [
        # opened UDP ports, any destination; --no-quic-reject opens 443 alike
        (
            CaptureOptions(exclude_udp_ports=rules.parse_ports("51820,8125,9000-9010")),
            Family.IPV4,
            [
                "-p udp -m udp --dport 8125 -j RETURN",
                "-p udp -m udp --dport 9000:9010 -j RETURN",
                "-p udp -m udp --dport 51820 -j RETURN",
            ],
        ),
        (CaptureOptions(quic_reject=False), Family.IPV6, ["-p udp -m udp --dport 443 -j RETURN"]),
        (
            CaptureOptions(quic_reject=False, exclude_udp_ports=rules.parse_ports("443,80")),
            Family.IPV4,
            ["-p udp -m udp --dport 80 -j RETURN", "-p udp -m udp --dport 443 -j RETURN"],
        ),
        # opened UDP CIDRs, split by family, UDP only
        (
            CaptureOptions(exclude_udp_cidrs=rules.parse_cidrs("198.18.5.0/24,fd00:5::/64")),
            Family.IPV4,
            ["-d 198.18.5.0/24 -p udp -j RETURN"],
        ),
        (
            CaptureOptions(exclude_udp_cidrs=rules.parse_cidrs("198.18.5.0/24,fd00:5::/64")),
            Family.IPV6,
            ["-d fd00:5::/64 -p udp -j RETURN"],
        ),
        # TCP port tuning does not open UDP
        (CaptureOptions(exclude_ports=rules.parse_ports("443")), Family.IPV4, []),
    ],
)
def test_udp_openings(opts: CaptureOptions, family: Family, returns: list[str]) -> None:
    chain = list(_filter(opts, family).rules)
    opened = [r for r in chain if "-p udp" in r and r.endswith("-j RETURN")]
    assert opened == returns
    # every opening comes before the DNS goto and the reject
    dns = chain.index("-p udp -m udp --dport 53 -g EGRESS_SIDECAR_DNS")
    assert all(chain.index(r) < dns for r in returns)
    assert chain[dns + 1].startswith("-p udp -j REJECT")


@pytest.mark.parametrize(
    ("servers", "family", "dns"),
    [
        ("", Family.IPV4, []),
        ("10.96.0.10", Family.IPV4, ["-d 10.96.0.10/32 -j RETURN"]),
        ("10.96.0.10", Family.IPV6, []),
        (
            "198.18.0.2, fd00::a,198.18.0.3",
            Family.IPV4,
            ["-d 198.18.0.2/32 -j RETURN", "-d 198.18.0.3/32 -j RETURN"],
        ),
        ("198.18.0.2, fd00::a", Family.IPV6, ["-d fd00::a/128 -j RETURN"]),
    ],
)
def test_dns_chain_lets_only_the_name_servers_through(
    servers: str, family: Family, dns: list[str]
) -> None:
    """Without the DNS listener (--no-dns-redirect) the app asks the name servers itself."""
    opts = CaptureOptions(dns_servers=rules.parse_addresses(servers), dns_port=None)
    t = _filter(opts, family)
    assert [name for name, _ in t.chains] == ["EGRESS_SIDECAR_DNS", "EGRESS_SIDECAR_OUTPUT"]
    assert list(dict(t.chains)["EGRESS_SIDECAR_DNS"]) == [
        *dns,
        f"-j REJECT --reject-with {family.reject_with}",
    ]


@pytest.mark.parametrize("family", list(Family))
def test_with_the_dns_listener_no_query_goes_to_a_name_server_unredirected(family: Family) -> None:
    """The listener takes every query (nat REDIRECT): one that reaches the filter table still
    addressed to a name server rode a conntrack entry of the sidecar's own, and is rejected;
    so is any datagram in the original direction of such an entry (only replies pass)."""
    opts = CaptureOptions(dns_servers=rules.parse_addresses("198.18.0.2, fd00::a"))
    assert opts.dns_port is not None
    t = _filter(opts, family)
    assert list(dict(t.chains)["EGRESS_SIDECAR_DNS"]) == [
        f"-j REJECT --reject-with {family.reject_with}"
    ]
    established = [r for r in t.rules if "ESTABLISHED" in r]
    assert established == ["-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN"]


# --- resolv.conf and address lists ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("nameserver 10.96.0.10\nsearch default.svc.cluster.local\n", ["10.96.0.10"]),
        (
            "# comment\nnameserver 10.96.0.10 # trailing\n; nameserver 9.9.9.9\n"
            "nameserver fd00:10::a\noptions ndots:5\n",
            ["10.96.0.10", "fd00:10::a"],
        ),
        ("nameserver fe80::1%eth0\n", ["fe80::1"]),  # zone dropped: -d takes none
        ("nameserver\nnameserver not-an-ip\nnameserver 1.2.3.4\n", ["1.2.3.4"]),
        ("nameserver 1.2.3.4\nnameserver 1.2.3.4\n", ["1.2.3.4"]),
        ("  nameserver\t198.18.0.2  \r\n", ["198.18.0.2"]),
        ("nameservers 1.2.3.4\nNAMESERVER 1.2.3.5\n", []),  # the C library's spelling only
        # MAXNS: a fourth server is never asked, so DNS to it is not let out.
        (
            "".join(f"nameserver 198.18.0.{n}\n" for n in range(1, 6)),
            ["198.18.0.1", "198.18.0.2", "198.18.0.3"],
        ),
        (
            "nameserver 1.2.3.4\nnameserver 1.2.3.4\nnameserver 1.2.3.4\nnameserver 5.6.7.8\n",
            ["1.2.3.4"],
        ),
        (
            "nameserver x\nnameserver 1.1.1.1\nnameserver y\nnameserver 2.2.2.2\n"
            "nameserver fe80::1%eth0\nnameserver 3.3.3.3\n",
            ["1.1.1.1", "2.2.2.2", "fe80::1"],
        ),
    ],
)
def test_parse_resolv_conf(text: str, expected: list[str]) -> None:
    assert [str(a) for a in rules.parse_resolv_conf(text)] == expected


@given(st.lists(st.ip_addresses(), max_size=6), st.lists(st.text(max_size=30), max_size=6))
def test_parse_resolv_conf_finds_every_nameserver_line(
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address], noise: list[str]
) -> None:
    lines = [f"nameserver {a}" for a in addrs]
    # Lines that are not nameserver lines never add (or break) anything.
    lines += [f"#{n}".replace("\n", " ").replace("\r", " ") for n in noise]
    found = rules.parse_resolv_conf("\n".join(lines))
    # The C library asks the first three lines' servers only (MAXNS), repeats included.
    assert list(found) == list(dict.fromkeys(addrs[:3]))


@given(st.text(max_size=200))
def test_parse_resolv_conf_never_raises(text: str) -> None:
    assert all(isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address)
               for a in rules.parse_resolv_conf(text))  # fmt: skip


@pytest.mark.parametrize("text", ["10.0.0.0/8", "x", "1.2.3.4.5", "fe80::1%eth0"])
def test_parse_addresses_rejects_and_names_the_item(text: str) -> None:
    with pytest.raises(RuleOptionError, match=f"--dns-servers: '{text}'"):
        rules.parse_addresses(text)


def test_render_rules_is_one_commit_per_table() -> None:
    text = rules.render_rules(CaptureOptions(), Family.IPV4)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines.count("COMMIT") == 2 and lines[-1] == "COMMIT"
    assert lines[1] == ":EGRESS_SIDECAR_OUTPUT - [0:0]"
    assert lines[2] == "-I OUTPUT 1 -p tcp -j EGRESS_SIDECAR_OUTPUT"
    filt = lines[lines.index("*filter") :]
    assert filt[1:5] == [
        ":EGRESS_SIDECAR_DNS - [0:0]",
        ":EGRESS_SIDECAR_OUTPUT - [0:0]",
        "-I OUTPUT 1 ! -p tcp -j EGRESS_SIDECAR_OUTPUT",
        "-A EGRESS_SIDECAR_DNS -j REJECT --reject-with icmp-port-unreachable",
    ]
    assert not any(line.startswith(("-D", "-X", "-F")) for line in lines)


# --- save parsing, re-apply and clean -------------------------------------------------------

SAVE_WITH_OURS_AND_OTHERS = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:EGRESS_SIDECAR_OUTPUT - [0:0]
:OTHER - [0:0]
-A OUTPUT -p udp -m udp --dport 443 -j EGRESS_SIDECAR_OUTPUT
-A OUTPUT -j OTHER
-A EGRESS_SIDECAR_OUTPUT -p udp -j REJECT --reject-with icmp-port-unreachable
-A OTHER -m comment --comment "keep me" -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:EGRESS_SIDECAR_OUTPUT - [0:0]
:EGRESS_SIDECAR_OLD - [0:0]
-A OUTPUT -p tcp -j EGRESS_SIDECAR_OUTPUT
-A OUTPUT -p tcp -m tcp --dport 25 -j EGRESS_SIDECAR_OLD
-A POSTROUTING -j MASQUERADE
-A EGRESS_SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15002
-A EGRESS_SIDECAR_OLD -j EGRESS_SIDECAR_OUTPUT
COMMIT
*mangle
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j MARK --set-xmark 0x1/0xffffffff
COMMIT
"""


def test_parse_save_finds_only_ours() -> None:
    state = rules.parse_save(SAVE_WITH_OURS_AND_OTHERS)
    assert set(state) == {"filter", "nat"}  # mangle has nothing of ours
    assert state["nat"].chains == ["EGRESS_SIDECAR_OUTPUT", "EGRESS_SIDECAR_OLD"]
    assert state["nat"].jumps == [
        ("OUTPUT", "-p tcp -j EGRESS_SIDECAR_OUTPUT"),
        ("OUTPUT", "-p tcp -m tcp --dport 25 -j EGRESS_SIDECAR_OLD"),
    ]
    assert state["filter"].jumps == [
        ("OUTPUT", "-p udp -m udp --dport 443 -j EGRESS_SIDECAR_OUTPUT")
    ]
    assert len(state["nat"].rules) == 2


@pytest.mark.parametrize("text", ["-A OUTPUT -j ACCEPT\n", "*nat\n-I OUTPUT 1 -j ACCEPT\nCOMMIT\n"])
def test_parse_save_rejects_garbage(text: str) -> None:
    with pytest.raises(SaveParseError, match="line"):
        rules.parse_save(text)


def test_parse_save_of_a_clean_namespace_is_empty() -> None:
    assert rules.parse_save("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ACCEPT\nCOMMIT\n") == {}


def test_reapply_replaces_ours_and_leaves_others() -> None:
    """Also the upgrade from the QUIC-only filter chain: its 443 jump goes, the new ones come."""
    state = rules.parse_save(SAVE_WITH_OURS_AND_OTHERS)
    text = rules.render_apply(CaptureOptions(quic_reject=False), Family.IPV4, state)
    assert text == (
        "*nat\n"
        ":EGRESS_SIDECAR_OUTPUT - [0:0]\n"
        "-D OUTPUT -p tcp -j EGRESS_SIDECAR_OUTPUT\n"
        "-D OUTPUT -p tcp -m tcp --dport 25 -j EGRESS_SIDECAR_OLD\n"
        "-F EGRESS_SIDECAR_OLD\n"
        "-X EGRESS_SIDECAR_OLD\n"
        "-I OUTPUT 1 -p tcp -j EGRESS_SIDECAR_OUTPUT\n"
        "-A EGRESS_SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -o lo -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -d 127.0.0.0/8 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15002\n"
        "COMMIT\n"
        "*filter\n"
        ":EGRESS_SIDECAR_DNS - [0:0]\n"
        ":EGRESS_SIDECAR_OUTPUT - [0:0]\n"
        "-D OUTPUT -p udp -m udp --dport 443 -j EGRESS_SIDECAR_OUTPUT\n"
        "-I OUTPUT 1 ! -p tcp -j EGRESS_SIDECAR_OUTPUT\n"
        "-A EGRESS_SIDECAR_DNS -j REJECT --reject-with icmp-port-unreachable\n"
        "-A EGRESS_SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -o lo -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -p udp -m udp --dport 443 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -p udp -m udp --dport 53 -g EGRESS_SIDECAR_DNS\n"
        "-A EGRESS_SIDECAR_OUTPUT -p udp -j REJECT --reject-with icmp-port-unreachable\n"
        "-A EGRESS_SIDECAR_OUTPUT -p icmp -m icmp --icmp-type 8 -j REJECT "
        "--reject-with icmp-admin-prohibited\n"
        "-A EGRESS_SIDECAR_OUTPUT -p icmp -m conntrack --ctstate RELATED -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -d 224.0.0.0/4 -p igmp -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -j REJECT --reject-with icmp-admin-prohibited\n"
        "COMMIT\n"
    )
    assert "OTHER" not in text and "MASQUERADE" not in text


def test_clean_removes_jumps_before_chains_and_flushes_before_deleting() -> None:
    text = rules.render_clean(rules.parse_save(SAVE_WITH_OURS_AND_OTHERS))
    nat = text.split("*nat\n")[1].split("COMMIT")[0].splitlines()
    assert nat == [
        "-D OUTPUT -p tcp -j EGRESS_SIDECAR_OUTPUT",
        "-D OUTPUT -p tcp -m tcp --dport 25 -j EGRESS_SIDECAR_OLD",
        "-F EGRESS_SIDECAR_OUTPUT",
        "-F EGRESS_SIDECAR_OLD",
        "-X EGRESS_SIDECAR_OUTPUT",
        "-X EGRESS_SIDECAR_OLD",
    ]


def test_clean_of_nothing_is_empty() -> None:
    assert rules.render_clean({}) == ""
    assert rules.render_clean({"nat": TableState()}) == ""


def test_saved_form_matches_what_save_shows_after_a_fresh_apply() -> None:
    # Without the DNS redirect (recorded before it existed; tests/netns applies both forms).
    opts = CaptureOptions(dns_servers=rules.parse_addresses("198.18.0.2"), dns_port=None)
    text = rules.render_rules(opts, Family.IPV4)
    # What iptables-save printed after loading exactly this text (nft and legacy agree).
    save = (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":EGRESS_SIDECAR_DNS - [0:0]\n"
        ":EGRESS_SIDECAR_OUTPUT - [0:0]\n"
        "-A OUTPUT ! -p tcp -j EGRESS_SIDECAR_OUTPUT\n"
        "-A EGRESS_SIDECAR_DNS -d 198.18.0.2/32 -j RETURN\n"
        "-A EGRESS_SIDECAR_DNS -j REJECT --reject-with icmp-port-unreachable\n"
        "-A EGRESS_SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -o lo -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -p udp -m udp --dport 53 -g EGRESS_SIDECAR_DNS\n"
        "-A EGRESS_SIDECAR_OUTPUT -p udp -j REJECT --reject-with icmp-port-unreachable\n"
        "-A EGRESS_SIDECAR_OUTPUT -p icmp -m icmp --icmp-type 8 -j REJECT "
        "--reject-with icmp-admin-prohibited\n"
        "-A EGRESS_SIDECAR_OUTPUT -p icmp -m conntrack --ctstate RELATED -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -d 224.0.0.0/4 -p igmp -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -j REJECT --reject-with icmp-admin-prohibited\n"
        "COMMIT\n"
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n:EGRESS_SIDECAR_OUTPUT - [0:0]\n"
        "-A OUTPUT -p tcp -j EGRESS_SIDECAR_OUTPUT\n"
        "-A EGRESS_SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -o lo -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -d 127.0.0.0/8 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15002\n"
        "COMMIT\n"
    )
    assert rules.ours_in_save(save) == rules.saved_form(text)
    assert rules.ours_in_save(save.replace("15002", "15003")) != rules.saved_form(text)


@given(
    st.lists(st.integers(1, 65535), max_size=5),
    st.lists(st.integers(1, 65535), max_size=5),
    st.booleans(),
    st.sampled_from(list(Family)),
)
def test_apply_over_own_rules_deletes_every_old_jump(
    excl: list[int], incl: list[int], quic: bool, fam: Family
) -> None:
    """Whatever was applied before, re-applying over it never leaves a second jump."""
    opts = CaptureOptions(
        exclude_ports=rules.parse_ports(",".join(map(str, excl))),
        include_ports=rules.parse_ports(",".join(map(str, incl)), allow_all=True),
        quic_reject=quic,
    )
    first = rules.saved_form(rules.render_rules(opts, fam))
    save = "".join(
        f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
        for table, lines in first.items()
    )
    state = rules.parse_save(save)
    again = rules.render_apply(CaptureOptions(), fam, state).splitlines()
    deleted = [line for line in again if line.startswith("-D OUTPUT ")]
    old_jumps = [line for lines in first.values() for line in lines if line.startswith("-A OUTPUT")]
    assert len(deleted) == len(old_jumps) == 2  # nat: TCP; filter: everything but TCP
    assert sum(line.startswith("-I OUTPUT ") for line in again) == 2


def test_saved_form_of_the_dns_redirect_matches_what_save_shows() -> None:
    opts = CaptureOptions(dns_servers=rules.parse_addresses("198.18.0.2"))
    text = rules.render_rules(opts, Family.IPV4)
    # What iptables-save (1.8.9, nf_tables) printed of the nat table after loading this text.
    save = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n:EGRESS_SIDECAR_DNS - [0:0]\n:EGRESS_SIDECAR_OUTPUT - [0:0]\n"
        "-A OUTPUT -p udp -m udp --dport 53 -j EGRESS_SIDECAR_DNS\n"
        "-A OUTPUT -p tcp -m tcp --dport 53 -j EGRESS_SIDECAR_DNS\n"
        "-A OUTPUT -p tcp -j EGRESS_SIDECAR_OUTPUT\n"
        "-A EGRESS_SIDECAR_DNS -m owner --uid-owner 1337 -j RETURN\n"
        "-A EGRESS_SIDECAR_DNS -d 198.18.0.2/32 -p udp -m udp --dport 53 -j REDIRECT "
        "--to-ports 15053\n"
        "-A EGRESS_SIDECAR_DNS -d 198.18.0.2/32 -p tcp -m tcp --dport 53 -j REDIRECT "
        "--to-ports 15053\n"
        "-A EGRESS_SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -o lo -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -d 127.0.0.0/8 -j RETURN\n"
        "-A EGRESS_SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15002\n"
        "COMMIT\n"
    )
    assert rules.ours_in_save(save)["nat"] == rules.saved_form(text)["nat"]


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_dns_redirect_only_to_the_pods_name_servers_and_never_for_the_proxy(
    family: Family,
) -> None:
    servers = rules.parse_addresses("10.96.0.10, fd00:10:96::a")
    nat = rules.desired_tables(CaptureOptions(dns_servers=servers), family)[0]
    dns = dict(nat.chains)[rules.DNS_CHAIN]
    assert dns[0] == "-m owner --uid-owner 1337 -j RETURN"
    server = "10.96.0.10/32" if family is Family.IPV4 else "fd00:10:96::a/128"
    assert dns[1:] == (
        f"-d {server} -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
        f"-d {server} -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
    )
    # Before the TCP capture jump, whose RETURNs (excluded CIDRs) would otherwise win.
    assert nat.jumps[-1] == "-p tcp -j EGRESS_SIDECAR_OUTPUT"
    assert nat.jumps[:2] == (
        "-p udp -m udp --dport 53 -j EGRESS_SIDECAR_DNS",
        "-p tcp -m tcp --dport 53 -j EGRESS_SIDECAR_DNS",
    )
    off = rules.desired_tables(CaptureOptions(dns_servers=servers, dns_port=None), family)[0]
    assert rules.DNS_CHAIN not in dict(off.chains)
    none = rules.desired_tables(CaptureOptions(), family)[0]
    assert none.jumps == ("-p tcp -j EGRESS_SIDECAR_OUTPUT",)
