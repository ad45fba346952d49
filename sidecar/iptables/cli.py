"""`egress-sidecar iptables apply|print|clean` — what the ``egress-init`` container runs.

Only the standard library and the pure rules module are imported: the init container starts
this and must be quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from sidecar.contract import DNS_LISTEN_PORT, PROXY_UID, TRANSPARENT_PORT
from sidecar.iptables import apply as adapter
from sidecar.iptables import rules
from sidecar.iptables.rules import CaptureOptions, Family, RuleOptionError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
RESOLV_CONF: Final = "/etc/resolv.conf"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "iptables",
        help="install, show or remove the transparent-capture iptables rules",
        description=(
            "Redirect the pod's outbound TCP (every UID but the proxy's) to the sidecar's "
            "transparent listener; reject its outbound UDP (QUIC falls back to TCP) except DNS "
            "to the pod's name servers and the opened UDP ports and CIDRs, and its ICMP echo "
            "requests; excluded CIDRs are left alone for every protocol. "
            f"Rules live in chains named {rules.CHAIN_PREFIX}* in the nat and filter tables, "
            "IPv4 and IPv6; other rules are left alone."
        ),
    )
    actions = parser.add_subparsers(dest="iptables_action", metavar="ACTION", required=True)

    p_apply = actions.add_parser(
        "apply", help="load the rules (atomic per table; re-applying replaces ours)"
    )
    _rule_options(p_apply)
    _system_options(p_apply)
    p_apply.add_argument(
        "--dry-run",
        action="store_true",
        help="print the restore input apply would load now (including removal of old rules)",
    )
    p_apply.set_defaults(func=_cmd_apply)

    p_print = actions.add_parser(
        "print", help="show exactly the rules apply loads (iptables-restore format)"
    )
    _rule_options(p_print)
    _ipv6_option(p_print)
    p_print.set_defaults(func=_cmd_print)

    p_clean = actions.add_parser(
        "clean", help=f"remove our chains ({rules.CHAIN_PREFIX}*) and the jumps into them"
    )
    _system_options(p_clean)
    p_clean.set_defaults(func=_cmd_clean)


def _rule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--proxy-uid",
        type=int,
        default=PROXY_UID,
        help=f"UID of the proxy; its traffic is never redirected (default {PROXY_UID})",
    )
    p.add_argument(
        "--proxy-gid",
        type=int,
        default=None,
        help="also exempt traffic of this GID (default: none, only the UID is exempt)",
    )
    p.add_argument(
        "--proxy-port",
        type=int,
        default=TRANSPARENT_PORT,
        help=f"transparent listener port to redirect to (default {TRANSPARENT_PORT})",
    )
    p.add_argument(
        "--exclude-outbound-cidrs",
        default="",
        metavar="CIDR,...",
        help=(
            "destinations never redirected, IPv4 and/or IPv6 (default: none beyond loopback; "
            "pass the cluster's pod and service CIDRs, as the injector does)"
        ),
    )
    p.add_argument(
        "--exclude-outbound-ports",
        default="",
        metavar="PORT,...",
        help="destination ports never redirected; ranges as A-B (exclusion wins over inclusion)",
    )
    p.add_argument(
        "--include-outbound-ports",
        default="*",
        metavar="PORT,...",
        help="redirect only these destination ports; '*' or empty = all (default)",
    )
    p.add_argument(
        "--no-quic-reject",
        dest="quic_reject",
        action="store_false",
        help="let UDP 443 (QUIC) out, as --exclude-outbound-udp-ports 443 does",
    )
    p.add_argument(
        "--exclude-outbound-udp-ports",
        default="",
        metavar="PORT,...",
        help="UDP destination ports let out (all other UDP is rejected); ranges as A-B",
    )
    p.add_argument(
        "--exclude-outbound-udp-cidrs",
        default="",
        metavar="CIDR,...",
        help="destinations to which UDP (any port) is let out, IPv4 and/or IPv6",
    )
    p.add_argument(
        "--dns-servers",
        default=None,
        metavar="IP,...",
        help=(
            "the only destinations of UDP port 53 let out; empty = none "
            "(default: the nameserver lines of --resolv-conf)"
        ),
    )
    p.add_argument(
        "--dns-port",
        type=int,
        default=DNS_LISTEN_PORT,
        help="the sidecar's DNS listener: the app's DNS (UDP and TCP 53) to the name servers "
        f"is redirected there (default {DNS_LISTEN_PORT})",
    )
    p.add_argument(
        "--no-dns-redirect",
        dest="dns_redirect",
        action="store_false",
        help="do not redirect DNS to the sidecar; only let UDP 53 out to the name servers",
    )
    p.add_argument(
        "--resolv-conf",
        default=RESOLV_CONF,
        metavar="PATH",
        help=(
            f"where the name servers are read when --dns-servers is not given (default "
            f"{RESOLV_CONF}: in egress-init, the pod's own, as the app sees it)"
        ),
    )


def _ipv6_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ipv6",
        choices=("auto", "on", "off"),
        default="auto",
        help="also handle IPv6 (ip6tables); auto = when the kernel has IPv6 (default)",
    )


def _system_options(p: argparse.ArgumentParser) -> None:
    _ipv6_option(p)
    p.add_argument(
        "--backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="iptables backend; auto = the one `iptables --version` names (default)",
    )


def dns_servers(args: argparse.Namespace) -> tuple[tuple[rules.Address, ...], str]:
    """The name servers to let DNS through to, and where they came from (for the output)."""
    if args.dns_servers is not None:
        return rules.parse_addresses(args.dns_servers), "--dns-servers"
    path = Path(args.resolv_conf)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        # The C library then asks 127.0.0.1, which loopback rules already let through.
        return (), f"{path} (missing)"
    except OSError as exc:
        raise RuleOptionError(f"--resolv-conf: cannot read {path}: {exc.strerror}") from None
    return rules.parse_resolv_conf(text), str(path)


def options_from_args(
    args: argparse.Namespace, servers: tuple[rules.Address, ...] = ()
) -> CaptureOptions:
    return CaptureOptions(
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        proxy_port=args.proxy_port,
        exclude_cidrs=rules.parse_cidrs(args.exclude_outbound_cidrs),
        exclude_ports=rules.parse_ports(args.exclude_outbound_ports),
        include_ports=rules.parse_ports(
            args.include_outbound_ports, option="--include-outbound-ports", allow_all=True
        ),
        quic_reject=args.quic_reject,
        exclude_udp_cidrs=rules.parse_cidrs(
            args.exclude_outbound_udp_cidrs, option="--exclude-outbound-udp-cidrs"
        ),
        exclude_udp_ports=rules.parse_ports(
            args.exclude_outbound_udp_ports, option="--exclude-outbound-udp-ports"
        ),
        dns_servers=servers,
        dns_port=args.dns_port if args.dns_redirect else None,
    )


def dns_note(servers: tuple[rules.Address, ...], source: str, dns_port: int | None = None) -> str:
    shown = ", ".join(map(str, servers)) or "none"
    if servers and dns_port is not None:
        return (
            f"# DNS (UDP and TCP 53) to: {shown} (from {source}) redirected to port {dns_port} "
            "(the sidecar's DNS listener)\n"
        )
    return f"# DNS (UDP 53) let out to: {shown} (from {source})\n"


def render_print(opts: CaptureOptions, fams: list[Family]) -> str:
    parts = []
    for fam in fams:
        tool = fam.restore_command + "-restore"
        parts.append(f"# {fam.value}: load with `{tool} --noflush`\n")
        parts.append(rules.render_rules(opts, fam))
    return "".join(parts)


def _cmd_print(args: argparse.Namespace) -> int:
    try:
        servers, source = dns_servers(args)
        opts = options_from_args(args, servers)
    except RuleOptionError as exc:
        print(f"egress-sidecar iptables print: {exc}", file=sys.stderr)
        return EXIT_USAGE
    note = dns_note(servers, source, opts.dns_port)
    sys.stdout.write(note + render_print(opts, adapter.families(args.ipv6)))
    return EXIT_OK


def _cmd_apply(args: argparse.Namespace) -> int:
    try:
        servers, source = dns_servers(args)
        opts = options_from_args(args, servers)
    except RuleOptionError as exc:
        print(f"egress-sidecar iptables apply: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        backend = adapter.resolve_backend(args.backend)
        plans = []
        for fam in adapter.families(args.ipv6):
            tools = adapter.tools_for(fam, backend)
            plans.append((fam, tools, adapter.plan_apply(opts, fam, tools)))
        for fam, tools, text in plans:
            if args.dry_run:
                sys.stdout.write(f"# {fam.value}: {tools.restore} --noflush\n{text}")
            else:
                adapter.restore(tools, text)
    except (adapter.IptablesError, rules.SaveParseError) as exc:
        print(f"egress-sidecar iptables apply: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not args.dry_run:
        done = ", ".join(f"{fam.value} ({tools.restore})" for fam, tools, _ in plans)
        print(f"egress-sidecar iptables: capture rules applied for {done}", file=sys.stderr)
        note = dns_note(servers, source, opts.dns_port)[2:]
        print(f"egress-sidecar iptables: {note}", end="", file=sys.stderr)
    return EXIT_OK


def _cmd_clean(args: argparse.Namespace) -> int:
    try:
        backend = adapter.resolve_backend(args.backend)
        for fam in adapter.families(args.ipv6):
            tools = adapter.tools_for(fam, backend)
            adapter.restore(tools, adapter.plan_clean(tools))
    except (adapter.IptablesError, rules.SaveParseError) as exc:
        print(f"egress-sidecar iptables clean: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m sidecar.iptables.cli apply ...``), same as
    `egress-sidecar iptables ...` without importing the other subcommands."""
    parser = argparse.ArgumentParser(prog="egress-sidecar")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["iptables", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
