"""Pure generator of the transparent-capture rules (no I/O).

Produces the exact ``iptables-restore --noflush`` / ``ip6tables-restore --noflush`` text that
`egress-sidecar iptables apply` loads, and parses ``iptables-save`` output to find what an
earlier run left, so that a re-apply replaces our chains and ``clean`` removes only them.

The rules live in chains of our own, reached by jumps inserted at the top of the built-in
``OUTPUT`` chain. Every rule exempts the proxy's own UID (and GID when given): its traffic is
what the policy let through.

nat ``OUTPUT`` (TCP) → ``EGRESS_SIDECAR_OUTPUT``:
    RETURN for the proxy; RETURN for ``-o lo`` and the loopback range; RETURN for excluded CIDRs
    and excluded ports; REDIRECT ``--to-ports <proxy port>`` for the remaining TCP (only the
    included ports when an include list is given).

filter ``OUTPUT`` (everything but TCP) → ``EGRESS_SIDECAR_OUTPUT``:
    RETURN for the proxy, ``-o lo``, replies within a flow begun from outside (conntrack
    ESTABLISHED in the reply direction: a UDP server in the pod answering; an app datagram that
    matches a flow of the sidecar's own is in the original direction and does not pass) and
    excluded CIDRs (cluster-internal traffic is not egress, whatever its protocol); RETURN for
    UDP to the opened UDP CIDRs and ports; UDP port 53 goes (``-g``) to ``EGRESS_SIDECAR_DNS``,
    which lets through only the pod's name servers, and none when the DNS listener takes the
    queries (a query that reaches it then escaped the REDIRECT); every other UDP datagram is
    REJECTed with port-unreachable (the client fails at once, QUIC falls back to TCP, where it
    is captured); an ICMP echo-request is REJECTed with admin-prohibited. ICMP errors about a
    flow conntrack knows (``RELATED``), ICMPv6 neighbour and router discovery and MLD, and IGMP
    to multicast groups RETURN; every other protocol and ICMP message is REJECTed with
    admin-prohibited: an unprivileged app opens UDP-Lite (136) sockets, which ``-p udp`` does
    not match, and a root app with CAP_NET_RAW sends any IP protocol or ICMP message (an echo
    reply or a forged error carries a payload as well).

nat ``OUTPUT`` (UDP and TCP port 53) → ``EGRESS_SIDECAR_DNS`` (before the TCP jump):
    RETURN for the proxy; REDIRECT ``--to-ports <dns port>`` (the sidecar's DNS listener,
    15053) for DNS to the pod's name servers, so every query the app makes is decided there.
    DNS to any other server is not redirected: over UDP the filter table's DNS chain rejects it,
    over TCP it is captured like any TCP connection and decided by the proxy (denied unless a
    cidr rule allows that address on port 53). Redirected queries reach the filter table on
    ``lo``, which returns them.

Rules are written in the canonical form ``iptables-save`` prints (``-m tcp`` after ``-p tcp``,
networks normalised, our chains in name order), so that what ``print`` shows is line for line
what ``iptables-save`` lists after ``apply``, with both the nf_tables and the legacy backend.

Defaults: no CIDR is excluded beyond loopback. Cluster-internal ranges (pod and service CIDRs)
are not knowable from inside the pod, so the injector passes them explicitly with
``--exclude-outbound-cidrs``. The name servers come from the pod's ``/etc/resolv.conf``, read by
the adapter (``parse_resolv_conf`` here).
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from sidecar.contract import DNS_LISTEN_PORT, DNS_PORT, PROXY_UID, TRANSPARENT_PORT

CHAIN_PREFIX: Final = "EGRESS_SIDECAR_"
OUTPUT_CHAIN: Final = CHAIN_PREFIX + "OUTPUT"
DNS_CHAIN: Final = CHAIN_PREFIX + "DNS"
QUIC_PORT: Final = 443
MULTICAST_V4: Final = "224.0.0.0/4"
RESOLV_MAXNS: Final = 3  # MAXNS of <resolv.h>: name servers a resolver uses
TABLES: Final = ("nat", "filter")

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network
type Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RuleOptionError(ValueError):
    """An option value (CIDR list, port list, UID...) is malformed; the message names it."""


class SaveParseError(ValueError):
    """``iptables-save`` output could not be understood."""


class Family(Enum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def version(self) -> int:
        return 4 if self is Family.IPV4 else 6

    @property
    def loopback(self) -> str:
        return "127.0.0.0/8" if self is Family.IPV4 else "::1/128"

    @property
    def reject_with(self) -> str:
        """For UDP: the client sees ECONNREFUSED at once, as from a closed port."""
        return "icmp-port-unreachable" if self is Family.IPV4 else "icmp6-port-unreachable"

    @property
    def reject_echo_with(self) -> str:
        """For ICMP echo and protocols other than TCP, UDP and ICMP: ``ping`` reports the
        destination administratively prohibited."""
        return "icmp-admin-prohibited" if self is Family.IPV4 else "icmp6-adm-prohibited"

    @property
    def echo_request(self) -> str:
        """Match of an ICMP echo-request (IPv4 type 8, ICMPv6 type 128), as iptables-save
        prints it. Only this ICMP type is ours: errors and neighbour discovery pass."""
        if self is Family.IPV4:
            return "-p icmp -m icmp --icmp-type 8"
        return "-p ipv6-icmp -m icmp6 --icmpv6-type 128"

    @property
    def untracked_icmp(self) -> tuple[int, ...]:
        """ICMPv6 types the kernel sends outside any flow: MLD (130-132, 143), router and
        neighbour solicitation and advertisement, redirect (133-137). IPv4 has ARP instead."""
        return () if self is Family.IPV4 else (130, 131, 132, 133, 134, 135, 136, 137, 143)

    @property
    def icmp(self) -> str:
        """Match of every ICMP message of this family, as iptables-save prints it."""
        return "-p icmp" if self is Family.IPV4 else "-p ipv6-icmp"

    @property
    def restore_command(self) -> str:
        """Base name of the restore tool (the adapter adds the backend)."""
        return "iptables" if self is Family.IPV4 else "ip6tables"


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= 65535):
            raise RuleOptionError(
                f"bad port range {self.first}-{self.last}: need 1 <= A <= B <= 65535"
            )

    def contains(self, port: int) -> bool:
        return self.first <= port <= self.last

    def spec(self) -> str:
        """The ``--dport`` argument as iptables-save prints it."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


@dataclass(frozen=True)
class CaptureOptions:
    """What to capture. Empty ``include_ports`` means every port.

    ``exclude_udp_cidrs``/``exclude_udp_ports`` open UDP to those destinations (every other UDP
    is rejected); ``quic_reject=False`` opens UDP 443 alike. ``dns_servers``: the pod's name
    servers, the only destinations of UDP port 53 let through (beyond excluded CIDRs)."""

    proxy_uid: int = PROXY_UID
    proxy_gid: int | None = None
    proxy_port: int = TRANSPARENT_PORT
    exclude_cidrs: tuple[Network, ...] = ()
    exclude_ports: tuple[PortRange, ...] = ()
    include_ports: tuple[PortRange, ...] = ()
    quic_reject: bool = True
    exclude_udp_cidrs: tuple[Network, ...] = ()
    exclude_udp_ports: tuple[PortRange, ...] = ()
    dns_servers: tuple[Address, ...] = ()
    # The sidecar's DNS listener: the app's DNS to the pod's name servers (UDP and TCP 53) is
    # redirected there (None: not redirected, only let through to those servers).
    dns_port: int | None = DNS_LISTEN_PORT

    def __post_init__(self) -> None:
        for name, value in (("proxy uid", self.proxy_uid), ("proxy gid", self.proxy_gid)):
            if value is not None and not (0 <= value < 2**32 - 1):
                raise RuleOptionError(f"bad {name} {value}: need 0 <= id < 4294967295")
        if not (1 <= self.proxy_port <= 65535):
            raise RuleOptionError(f"bad proxy port {self.proxy_port}: need 1..65535")
        if self.dns_port is not None and not (1 <= self.dns_port <= 65535):
            raise RuleOptionError(f"bad DNS port {self.dns_port}: need 1..65535")

    def udp_open_ports(self) -> tuple[PortRange, ...]:
        quic = () if self.quic_reject else (PortRange(QUIC_PORT, QUIC_PORT),)
        return tuple(sorted(set(self.exclude_udp_ports) | set(quic)))


@dataclass(frozen=True)
class TableRules:
    """Our part of one table: the jumps from OUTPUT and the rules of each of our chains."""

    table: str
    jumps: tuple[str, ...]  # rule specs inserted at the top of OUTPUT, in this order
    chains: tuple[tuple[str, tuple[str, ...]], ...]  # (chain, rule specs), in name order

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules of ``EGRESS_SIDECAR_OUTPUT``."""
        return dict(self.chains).get(OUTPUT_CHAIN, ())


@dataclass
class TableState:
    """What ``iptables-save`` shows of ours in one table."""

    chains: list[str] = field(default_factory=list)
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (builtin chain, rule spec)
    rules: list[str] = field(default_factory=list)  # "-A EGRESS_SIDECAR_... ..." lines


type SavedState = dict[str, TableState]


# --- option parsing -------------------------------------------------------------------------


def parse_cidrs(text: str, *, option: str = "--exclude-outbound-cidrs") -> tuple[Network, ...]:
    """``"10.0.0.0/8, fd00::/8"`` → sorted unique networks (host bits cleared, as iptables does)."""
    nets: set[Network] = set()
    for item in _items(text):
        try:
            nets.add(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise RuleOptionError(f"{option}: {item!r} is not an IP network ({exc})") from None
    return tuple(sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def parse_ports(
    text: str, *, option: str = "--exclude-outbound-ports", allow_all: bool = False
) -> tuple[PortRange, ...]:
    """``"80,8000-8080"`` → sorted unique ranges. ``*`` (when ``allow_all``) or empty → ``()``."""
    items = _items(text)
    if items == ["*"]:
        if allow_all:
            return ()
        raise RuleOptionError(f"{option}: '*' is not allowed here")
    ranges: set[PortRange] = set()
    for item in items:
        lo, sep, hi = item.replace(":", "-").partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise RuleOptionError(f"{option}: {item!r} is not a port or a range A-B") from None
        try:
            ranges.add(PortRange(first, last))
        except RuleOptionError as exc:
            raise RuleOptionError(f"{option}: {item!r}: {exc}") from None
    return tuple(sorted(ranges))


def parse_addresses(text: str, *, option: str = "--dns-servers") -> tuple[Address, ...]:
    """``"10.96.0.10, fd00::a"`` → addresses in the given order, duplicates dropped."""
    out: list[Address] = []
    for item in _items(text):
        try:
            # A zone ("fe80::1%eth0") is not something -d can match: refused like a typo.
            addr = ipaddress.ip_address(item if "%" not in item else "")
        except ValueError:
            raise RuleOptionError(f"{option}: {item!r} is not an IP address") from None
        if addr not in out:
            out.append(addr)
    return tuple(out)


def parse_resolv_conf(text: str) -> tuple[Address, ...]:
    """The ``nameserver`` addresses of a resolv.conf, as the C library reads them: the first
    word after ``nameserver``; a zone (``fe80::1%eth0``) dropped; a line that is not an address
    ignored (the resolver ignores it too, so no query goes there); only the first
    ``RESOLV_MAXNS`` addresses, repeats included (glibc, musl and Go never ask a later one)."""
    used: list[Address] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            used.append(ipaddress.ip_address(words[1].partition("%")[0]))
        except ValueError:
            continue
        if len(used) == RESOLV_MAXNS:
            break
    return tuple(dict.fromkeys(used))


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --- rendering ------------------------------------------------------------------------------


def _owner_returns(opts: CaptureOptions) -> list[str]:
    rules = [f"-m owner --uid-owner {opts.proxy_uid} -j RETURN"]
    if opts.proxy_gid is not None:
        rules.append(f"-m owner --gid-owner {opts.proxy_gid} -j RETURN")
    return rules


def desired_tables(opts: CaptureOptions, family: Family) -> list[TableRules]:
    """Our chains' content for one address family, nat first."""
    return [_nat_table(opts, family), _filter_table(opts, family)]


def _same_family[N: Network | Address](items: tuple[N, ...], family: Family) -> list[N]:
    return [item for item in items if item.version == family.version]


def _nat_table(opts: CaptureOptions, family: Family) -> TableRules:
    nat = [
        *_owner_returns(opts),
        "-o lo -j RETURN",
        f"-d {family.loopback} -j RETURN",
        *(f"-d {net} -j RETURN" for net in _same_family(opts.exclude_cidrs, family)),
        *(f"-p tcp -m tcp --dport {r.spec()} -j RETURN" for r in opts.exclude_ports),
    ]
    redirect = f"-j REDIRECT --to-ports {opts.proxy_port}"
    if opts.include_ports:
        nat += [f"-p tcp -m tcp --dport {r.spec()} {redirect}" for r in opts.include_ports]
    else:
        nat.append(f"-p tcp {redirect}")
    jumps: list[str] = []
    chains: list[tuple[str, tuple[str, ...]]] = []
    servers = _same_family(opts.dns_servers, family) if opts.dns_port is not None else []
    if servers:
        # Before the TCP jump and its RETURNs (the cluster DNS service is usually inside an
        # excluded CIDR): the app's queries to the pod's name servers go to the sidecar.
        dns = [
            *_owner_returns(opts),
            *(
                f"-d {addr}/{addr.max_prefixlen} -p {proto} -m {proto} --dport {DNS_PORT} "
                f"-j REDIRECT --to-ports {opts.dns_port}"
                for addr in servers
                for proto in ("udp", "tcp")
            ),
        ]
        jumps += [
            f"-p {proto} -m {proto} --dport {DNS_PORT} -j {DNS_CHAIN}" for proto in ("udp", "tcp")
        ]
        chains.append((DNS_CHAIN, tuple(dns)))
    jumps.append("-p tcp -j " + OUTPUT_CHAIN)
    chains.append((OUTPUT_CHAIN, tuple(nat)))
    return TableRules("nat", tuple(jumps), tuple(chains))


def _filter_table(opts: CaptureOptions, family: Family) -> TableRules:
    """UDP and ICMP echo: what TCP capture cannot see, so it may not leave unless opened."""
    servers = _same_family(opts.dns_servers, family)
    here = "127.0.0.1/32" if family is Family.IPV4 else "::1/128"
    main = [
        *_owner_returns(opts),
        "-o lo -j RETURN",
        # The app's DNS the nat table redirected to the sidecar: this table sees it with its
        # new destination but the output device chosen before the REDIRECT (not lo).
        *(
            [f"-d {here} -p udp -m udp --dport {opts.dns_port} -j RETURN"]
            if servers and opts.dns_port is not None
            else []
        ),
        # Replies of a flow someone else began (a UDP server in the pod) are not egress. Only
        # replies: an app datagram with the same addresses and ports as one of the sidecar's
        # own flows (its DNS forwards, whose source port the app may bind once the sidecar's
        # socket is closed) belongs to that conntrack entry, ESTABLISHED in the original
        # direction, and skipped the nat table's REDIRECT: it must not pass here.
        "-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
        *(f"-d {net} -j RETURN" for net in _same_family(opts.exclude_cidrs, family)),
        *(f"-d {net} -p udp -j RETURN" for net in _same_family(opts.exclude_udp_cidrs, family)),
        *(f"-p udp -m udp --dport {r.spec()} -j RETURN" for r in opts.udp_open_ports()),
        # goto: the DNS chain's verdict is final, its RETURN goes back to OUTPUT.
        f"-p udp -m udp --dport {DNS_PORT} -g {DNS_CHAIN}",
        f"-p udp -j REJECT --reject-with {family.reject_with}",
        f"{family.echo_request} -j REJECT --reject-with {family.reject_echo_with}",
        # The kernel's own ICMP: errors about a flow conntrack knows (a crafted "error" or an
        # unsolicited echo reply from a raw socket is not RELATED), and for IPv6 neighbour
        # discovery and MLD, which conntrack does not track. IGMP group reports.
        f"{family.icmp} -m conntrack --ctstate RELATED -j RETURN",
        *(f"{family.icmp} -m icmp6 --icmpv6-type {t} -j RETURN" for t in family.untracked_icmp),
        *([f"-d {MULTICAST_V4} -p igmp -j RETURN"] if family is Family.IPV4 else []),
        # UDP-Lite, SCTP, raw IP protocols: nothing the proxy could see either.
        f"-j REJECT --reject-with {family.reject_echo_with}",
    ]
    # With the DNS listener, the app's queries to the name servers reach this table redirected
    # (to the listener, returned above); one that still goes to a name server escaped the
    # REDIRECT through a conntrack entry of the sidecar's own (see above) and is rejected.
    redirected = bool(servers) and opts.dns_port is not None
    dns = [
        *(() if redirected else (f"-d {addr}/{addr.max_prefixlen} -j RETURN" for addr in servers)),
        f"-j REJECT --reject-with {family.reject_with}",
    ]
    jumps = (f"! -p tcp -j {OUTPUT_CHAIN}",)
    return TableRules("filter", jumps, ((DNS_CHAIN, tuple(dns)), (OUTPUT_CHAIN, tuple(main))))


def _table_body(t: TableRules) -> list[str]:
    return [
        *(f"-I OUTPUT {n} {spec}" for n, spec in enumerate(t.jumps, start=1)),
        *(f"-A {chain} {r}" for chain, specs in t.chains for r in specs),
    ]


def render_rules(opts: CaptureOptions, family: Family) -> str:
    """The restore text ``apply`` loads into a namespace that has none of our rules yet."""
    return render_apply(opts, family, {})


def render_apply(opts: CaptureOptions, family: Family, state: SavedState) -> str:
    """Restore text replacing whatever of ours ``state`` shows with the desired rules.

    Per table, one ``COMMIT`` (atomic): declaring our chain flushes it (or creates it), old
    jumps are deleted before the new one is inserted, chains of ours no longer wanted go.
    """
    wanted = {t.table: t for t in desired_tables(opts, family)}
    out: list[str] = []
    for table in TABLES:
        current = state.get(table, TableState())
        want = wanted.get(table)
        if want is None:
            out += _clean_table(table, current)
            continue
        names = [chain for chain, _ in want.chains]
        # Declaring a chain flushes it (or creates it).
        out += [f"*{table}", *(f":{chain} - [0:0]" for chain in names)]
        out += [f"-D {chain} {spec}" for chain, spec in current.jumps]
        gone = [chain for chain in current.chains if chain not in names]
        # Flush all first: one of the old chains may jump to another.
        out += [f"-F {chain}" for chain in gone] + [f"-X {chain}" for chain in gone]
        out += [*_table_body(want), "COMMIT"]
    return "".join(line + "\n" for line in out)


def render_clean(state: SavedState) -> str:
    """Restore text removing our jumps and chains; empty when there is nothing of ours."""
    out: list[str] = []
    for table in TABLES:
        out += _clean_table(table, state.get(table, TableState()))
    return "".join(line + "\n" for line in out)


def _clean_table(table: str, current: TableState) -> list[str]:
    if not current.chains and not current.jumps:
        return []
    lines = [f"*{table}"]
    lines += [f"-D {chain} {spec}" for chain, spec in current.jumps]
    # Flush all first: one of our chains may jump to another.
    lines += [f"-F {chain}" for chain in current.chains]
    lines += [f"-X {chain}" for chain in current.chains]
    return [*lines, "COMMIT"]


# --- iptables-save parsing ------------------------------------------------------------------


def parse_save(text: str) -> SavedState:
    """Our chains, the jumps into them and their rules, per table, from ``iptables-save`` text."""
    state: SavedState = {}
    current: TableState | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = state.setdefault(line[1:], TableState())
            continue
        if line == "COMMIT":
            current = None
            continue
        if current is None:
            raise SaveParseError(f"iptables-save line {number}: {line!r} outside a table")
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(CHAIN_PREFIX):
                current.chains.append(name)
            continue
        if not line.startswith("-A "):
            raise SaveParseError(f"iptables-save line {number}: unexpected {line!r}")
        _, chain, *rest = line.split(maxsplit=2)
        spec = rest[0] if rest else ""
        if chain.startswith(CHAIN_PREFIX):
            current.rules.append(line)
        elif _targets_ours(spec):
            current.jumps.append((chain, spec))
    return {table: st for table, st in state.items() if st.chains or st.jumps}


def _targets_ours(spec: str) -> bool:
    tokens = spec.split()
    return any(
        tok in ("-j", "--jump", "-g", "--goto") and nxt.startswith(CHAIN_PREFIX)
        for tok, nxt in itertools.pairwise(tokens)
    )


def saved_form(restore_text: str) -> dict[str, list[str]]:
    """How ``iptables-save`` lists, per table, what ``restore_text`` (from ``render_rules``)
    loads: our chain declarations, our jump shown as ``-A OUTPUT ...``, our ``-A`` lines.
    Used to prove that ``print`` shows exactly what ``apply`` loaded."""
    tables: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in restore_text.splitlines():
        if line.startswith("*"):
            lines = tables.setdefault(line[1:], [])
        elif line.startswith("-I OUTPUT "):
            lines.append("-A OUTPUT " + line.split(maxsplit=3)[3])
        elif line.startswith((":", "-A ")):
            lines.append(line)
    return tables


def ours_in_save(save_text: str) -> dict[str, list[str]]:
    """The lines of ``iptables-save`` output that concern us, per table (``saved_form`` shape);
    tables with nothing of ours are left out."""
    tables: dict[str, list[str]] = {}
    table = ""
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            continue
        mine = (line.startswith(":") and line[1:].startswith(CHAIN_PREFIX)) or (
            line.startswith("-A ")
            and (line.split()[1].startswith(CHAIN_PREFIX) or _targets_ours(line))
        )
        if mine:
            tables.setdefault(table, []).append(line)
    return tables
