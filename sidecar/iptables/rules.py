"""Pure generator of the transparent-capture rules (no I/O).

Produces the exact ``iptables-restore --noflush`` / ``ip6tables-restore --noflush`` text that
`egress-sidecar iptables apply` loads, and parses ``iptables-save`` output to find what an
earlier run left, so that a re-apply replaces our chains and ``clean`` removes only them.

The rules live in chains of our own (``EGRESS_SIDECAR_OUTPUT`` in the ``nat`` and ``filter``
tables), reached by one jump inserted at the top of the built-in ``OUTPUT`` chain:

nat ``OUTPUT`` (TCP) → ``EGRESS_SIDECAR_OUTPUT``:
    RETURN for the proxy's own UID (and GID when given) — its upstream connections must not loop;
    RETURN for ``-o lo`` and the loopback range; RETURN for excluded CIDRs and excluded ports;
    REDIRECT ``--to-ports <proxy port>`` for the remaining TCP (only the included ports when an
    include list is given).

filter ``OUTPUT`` (UDP 443) → ``EGRESS_SIDECAR_OUTPUT``:
    RETURN for the proxy's UID/GID, loopback and excluded CIDRs; REJECT (port unreachable) for
    the rest, so QUIC clients fall back to TCP, where they are captured. Emitted only when port
    443 is captured at all (not excluded, and in the include list if there is one).

Rules are written in the canonical form ``iptables-save`` prints (``-m tcp`` after ``-p tcp``,
networks normalised), so that what ``print`` shows is line for line what ``iptables-save``
lists after ``apply``, with both the nf_tables and the legacy backend.

Defaults: no CIDR is excluded beyond loopback. Cluster-internal ranges (pod and service CIDRs)
are not knowable from inside the pod, so the injector passes them explicitly with
``--exclude-outbound-cidrs``.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from sidecar.contract import PROXY_UID, TRANSPARENT_PORT

CHAIN_PREFIX: Final = "EGRESS_SIDECAR_"
OUTPUT_CHAIN: Final = CHAIN_PREFIX + "OUTPUT"
QUIC_PORT: Final = 443
TABLES: Final = ("nat", "filter")

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        return "icmp-port-unreachable" if self is Family.IPV4 else "icmp6-port-unreachable"

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
    """What to capture. Empty ``include_ports`` means every port."""

    proxy_uid: int = PROXY_UID
    proxy_gid: int | None = None
    proxy_port: int = TRANSPARENT_PORT
    exclude_cidrs: tuple[Network, ...] = ()
    exclude_ports: tuple[PortRange, ...] = ()
    include_ports: tuple[PortRange, ...] = ()
    quic_reject: bool = True

    def __post_init__(self) -> None:
        for name, value in (("proxy uid", self.proxy_uid), ("proxy gid", self.proxy_gid)):
            if value is not None and not (0 <= value < 2**32 - 1):
                raise RuleOptionError(f"bad {name} {value}: need 0 <= id < 4294967295")
        if not (1 <= self.proxy_port <= 65535):
            raise RuleOptionError(f"bad proxy port {self.proxy_port}: need 1..65535")

    def port_captured(self, port: int) -> bool:
        if any(r.contains(port) for r in self.exclude_ports):
            return False
        return not self.include_ports or any(r.contains(port) for r in self.include_ports)


@dataclass(frozen=True)
class TableRules:
    """Our part of one table: the jump from OUTPUT and the rules of our chain."""

    table: str
    jump: str  # rule spec appended to "-I OUTPUT 1 "
    rules: tuple[str, ...]  # rule specs appended to "-A EGRESS_SIDECAR_OUTPUT "


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
    excluded = [n for n in opts.exclude_cidrs if n.version == family.version]
    nat = [
        *_owner_returns(opts),
        "-o lo -j RETURN",
        f"-d {family.loopback} -j RETURN",
        *(f"-d {net} -j RETURN" for net in excluded),
        *(f"-p tcp -m tcp --dport {r.spec()} -j RETURN" for r in opts.exclude_ports),
    ]
    redirect = f"-j REDIRECT --to-ports {opts.proxy_port}"
    if opts.include_ports:
        nat += [f"-p tcp -m tcp --dport {r.spec()} {redirect}" for r in opts.include_ports]
    else:
        nat.append(f"-p tcp {redirect}")
    tables = [TableRules("nat", "-p tcp -j " + OUTPUT_CHAIN, tuple(nat))]
    if opts.quic_reject and opts.port_captured(QUIC_PORT):
        filt = [
            *_owner_returns(opts),
            "-o lo -j RETURN",
            *(f"-d {net} -j RETURN" for net in excluded),
            f"-p udp -j REJECT --reject-with {family.reject_with}",
        ]
        jump = f"-p udp -m udp --dport {QUIC_PORT} -j {OUTPUT_CHAIN}"
        tables.append(TableRules("filter", jump, tuple(filt)))
    return tables


def _table_body(t: TableRules) -> list[str]:
    return [f"-I OUTPUT 1 {t.jump}", *(f"-A {OUTPUT_CHAIN} {r}" for r in t.rules)]


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
        out += [f"*{table}", f":{OUTPUT_CHAIN} - [0:0]"]
        out += [f"-D {chain} {spec}" for chain, spec in current.jumps]
        for chain in current.chains:
            if chain != OUTPUT_CHAIN:
                out += [f"-F {chain}", f"-X {chain}"]
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
        elif line.startswith("-I OUTPUT 1 "):
            lines.append("-A OUTPUT " + line.removeprefix("-I OUTPUT 1 "))
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
