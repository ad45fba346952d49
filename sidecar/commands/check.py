"""`egress-sidecar check`: what the proxy would decide for one destination, without a proxy."""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.commands.options import add_policy_options, env_ranges
from sidecar.policy.errors import AllowlistError, InvalidHost
from sidecar.policy.hosts import split_host_port
from sidecar.policy.model import Destination, IPAddress, Mode
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore, apply_mode
from sidecar.proxy.hostnames import format_hostport

_DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetError(ValueError):
    """The destination given on the command line cannot be understood."""


def parse_target(target: str, method: str | None) -> Destination:
    """A URL (http: decided like a plain-HTTP request, https: like a CONNECT) or HOST[:PORT]."""
    if "://" in target:
        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise TargetError(f"{target!r}: only http:// and https:// URLs (or HOST[:PORT])")
        if not parts.hostname:
            raise TargetError(f"{target!r} names no host")
        try:
            explicit_port = parts.port
        except ValueError as err:
            raise TargetError(f"{target!r}: {err}") from None
        port = explicit_port or _DEFAULT_PORTS[scheme]
        if scheme == "http":
            return Destination(
                parts.hostname, port, None, (method or "GET").upper(), parts.path or "/"
            )
        return Destination(parts.hostname, port)
    try:
        host, maybe_port = split_host_port(target)
    except InvalidHost as err:
        raise TargetError(str(err)) from None
    return Destination(host, maybe_port or 443, None, method.upper() if method else None)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="print the decision for a URL or HOST[:PORT]",
        description="Decide one destination against an allowlist, as the proxy would, and print "
        "the decision, reason and rule. An http:// URL is decided like a plain-HTTP request "
        "(method and path visible), an https:// URL or HOST[:PORT] like a CONNECT (port 443 "
        "when none is given). Exit 0 when the call would go through (allow or audit), 1 when "
        "denied, 2 on bad input.",
    )
    add_policy_options(parser, file_required=True)
    parser.add_argument("target", metavar="URL|HOST[:PORT]")
    parser.add_argument("--method", "-X", help="HTTP method for http:// URLs (default GET)")
    addr = parser.add_mutually_exclusive_group()
    addr.add_argument(
        "--address", metavar="IP", help="decide as if the host resolved to IP (applies the guard)"
    )
    addr.add_argument(
        "--resolve",
        action="store_true",
        help="resolve the host with the system resolver and apply the private-address guard "
        "(the proxy does; without this the decision is by name only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        text = Path(args.allowlist_file).read_text(encoding="utf-8")
        policy = parse_allowlist(text, source=f"file:{args.allowlist_file}")
        dest = parse_target(args.target, args.method)
        address: IPAddress | None = ipaddress.ip_address(args.address) if args.address else None
    except (OSError, UnicodeDecodeError) as err:
        print(f"egress-sidecar check: cannot read {args.allowlist_file}: {err}", file=sys.stderr)
        return 2
    except AllowlistError as err:
        print(f"egress-sidecar check: invalid allowlist:\n{err}", file=sys.stderr)
        return 2
    except (TargetError, ValueError) as err:
        print(f"egress-sidecar check: {err}", file=sys.stderr)
        return 2
    ranges = list(args.allow_private_range) + env_ranges()
    store = PolicyStore(Mode(args.mode) if args.mode else None)
    snap = store.set_policy(policy.with_extra_private_ranges(ranges))
    if args.resolve and dest.host is not None:
        try:
            infos = socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)
        except OSError as err:
            print(f"egress-sidecar check: cannot resolve {dest.host}: {err}", file=sys.stderr)
            return 2
        addresses = tuple(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        raw, address = snap.decide_resolved(dest, addresses)
        decision = apply_mode(raw, snap.mode)
    else:
        decision = snap.decide(Destination(dest.host, dest.port, address, dest.method, dest.path))
    target = format_hostport(dest.host or "-", dest.port)
    if args.json:
        print(
            json.dumps(
                {
                    "decision": decision.verdict.value,
                    "reason": decision.reason.value,
                    "rule": decision.rule,
                    "detail": decision.detail,
                    "host": dest.host,
                    "port": dest.port,
                    "address": str(address) if address else None,
                    "method": dest.method,
                    "path": dest.path,
                    "policy_source": snap.source,
                    "policy_version": snap.version,
                }
            )
        )
    else:
        print(f"{decision.verdict.value} {target}")
        print(f"  reason: {decision.reason.value}")
        if decision.detail:
            print(f"  detail: {decision.detail}")
        print(f"  rule:   {decision.rule if decision.rule is not None else '-'}")
        print(f"  policy: {snap.source} version {snap.version} (mode {snap.mode.value})")
    return 0 if decision.permits else 1
