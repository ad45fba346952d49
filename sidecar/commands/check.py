"""`egress-sidecar check`: what the proxy would decide for one destination, without a proxy."""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.commands.options import add_policy_options, env_ranges
from sidecar.policy.dns import InternalNames, answer_denial, decide_query, filter_addresses
from sidecar.policy.errors import AllowlistError, clip
from sidecar.policy.model import Decision, Destination, IPAddress, Mode
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore, Snapshot, apply_mode
from sidecar.policy.target import InvalidTarget, parse_authority, parse_request_target
from sidecar.proxy.hostnames import format_hostport


class TargetError(ValueError):
    """The destination given on the command line cannot be understood."""


def https_request(target: str, method: str | None) -> tuple[str, str] | None:
    """(method, path) of an https:// URL: what an inspected host's request is decided by."""
    if not target.lower().startswith("https://"):
        return None
    try:
        parsed = parse_request_target(target)
    except InvalidTarget as err:
        raise TargetError(str(err)) from None
    return (method or "GET").upper(), parsed.path.split("?", 1)[0] or "/"


def inspected_destination(dest: Destination, target: str, method: str | None) -> Destination:
    """``dest`` (parsed from ``target``) to a host a rule inspects, as the sidecar decides it: an
    https:// URL is the request inside the inspected TLS (method and path visible), HOST[:PORT]
    the TLS channel (the rules' methods and paths deferred to its requests)."""
    inside = https_request(target, method)
    if inside is not None:
        return Destination(dest.host, dest.port, dest.address, inside[0], inside[1])
    return Destination(dest.host, dest.port, dest.address, inspected=True)


def parse_target(target: str, method: str | None) -> Destination:
    """A URL (http: decided like a plain-HTTP request, https: like a CONNECT) or HOST[:PORT].

    Read by the same parser as the proxy's (sidecar.policy.target): what the proxy answers
    400 is refused here (exit 2), never decided for some other reading of the same text.
    """
    try:
        if "://" in target:
            parsed = parse_request_target(target)
            host, port = parsed.authority.host, parsed.port
            if parsed.scheme == "http":
                path = parsed.path.split("?", 1)[0] or "/"  # as the decider compares it
                return Destination(host, port, None, (method or "GET").upper(), path)
            return Destination(host, port)
        authority = parse_authority(target)
    except InvalidTarget as err:
        raise TargetError(str(err)) from None
    # Like a CONNECT: no method or path is visible, whatever --method says (a rule that allows
    # only some methods grants no such channel, as the proxy decides it).
    return Destination(authority.host, authority.port or 443)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="print the decision for a URL or HOST[:PORT]",
        description="Decide one destination against an allowlist, as the proxy would, and print "
        "the decision, reason and rule. An http:// URL is decided like a plain-HTTP request "
        "(method and path visible), an https:// URL or HOST[:PORT] like a CONNECT (port 443 "
        "when none is given); an https:// URL to a host a rule inspects (inspect: true) like "
        "the HTTPS request inside the inspected TLS (method and path visible). "
        "Exit 0 when the call would go through (allow or audit), 1 when "
        "denied, 2 on bad input.",
    )
    add_policy_options(parser, file_required=True)
    parser.add_argument(
        "target",
        nargs="+",
        metavar="URL|HOST[:PORT] | dns NAME [TYPE]",
        help="a destination, or `dns NAME [TYPE]`: the DNS listener's decision for a query "
        "(TYPE default A); with --address, whether an answer holding IP would be let through "
        "(the rebinding filter)",
    )
    parser.add_argument(
        "--internal-domain",
        metavar="DOMAIN",
        action="append",
        default=[],
        help="dns form: a domain forwarded whatever the policy, as the sidecar's "
        "--dns-internal-domain and resolv.conf search domains (repeatable; svc.cluster.local "
        "always is)",
    )
    parser.add_argument(
        "--method",
        "-X",
        help="HTTP method for http:// URLs and https:// URLs to inspected hosts (default GET)",
    )
    addr = parser.add_mutually_exclusive_group()
    addr.add_argument(
        "--address",
        metavar="IP",
        help="decide as if the host resolved to IP (applies the guard; dns form: an answer "
        "holding IP)",
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
    if len(args.target) > 1 and args.target[0] == "dns":
        return run_dns(args)
    if len(args.target) != 1:
        print(
            "egress-sidecar check: give one URL or HOST[:PORT], or dns NAME [TYPE]",
            file=sys.stderr,
        )
        return 2
    try:
        text = Path(args.allowlist_file).read_text(encoding="utf-8")
        policy = parse_allowlist(text, source=f"file:{args.allowlist_file}")
        dest = parse_target(args.target[0], args.method)
        inside = https_request(args.target[0], args.method)
        address: IPAddress | None = ipaddress.ip_address(args.address) if args.address else None
    except (OSError, UnicodeDecodeError) as err:
        print(f"egress-sidecar check: cannot read {args.allowlist_file}: {err}", file=sys.stderr)
        return 2
    except AllowlistError as err:
        print(f"egress-sidecar check: invalid allowlist:\n{err}", file=sys.stderr)
        return 2
    except (TargetError, ValueError) as err:
        print(f"egress-sidecar check: {clip(err, 300)}", file=sys.stderr)
        return 2
    ranges = list(args.allow_private_range) + env_ranges()
    store = PolicyStore(Mode(args.mode) if args.mode else None)
    snap = store.set_policy(policy.with_extra_private_ranges(ranges))
    inspected_by = snap.inspection(dest.host, dest.port)
    if inspected_by is not None:
        dest = inspected_destination(dest, args.target[0], args.method)
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
        decision = snap.decide(
            Destination(dest.host, dest.port, address, dest.method, dest.path, dest.inspected)
        )
    target = format_hostport(dest.host or "-", dest.port)
    fields = {
        "host": dest.host,
        "port": dest.port,
        "address": str(address) if address else None,
        "method": dest.method,
        "path": dest.path,
        "inspected": inspected_by is not None,
    }
    extra = {}
    if inspected_by is not None:
        how = "requests decided by method and path" if inside else "the TLS channel"
        extra["tls"] = f"inspected by {inspected_by} ({how})"
    elif dest.method is None:
        extra["tls"] = "passthrough (not inspected)"
    headline = f"{decision.verdict.value} {target}"
    if inspected_by is not None and inside is not None:
        headline += f" {dest.method} {dest.path}"
    return _report(args.json, decision, snap, headline, fields, extra=extra)


def run_dns(args: argparse.Namespace) -> int:
    """`check dns NAME [TYPE]`: the DNS listener's decision (sidecar.policy.dns), and with
    --address the rebinding filter's verdict on an answer holding that address."""
    if len(args.target) > 3:
        print("egress-sidecar check: dns NAME [TYPE]", file=sys.stderr)
        return 2
    name = args.target[1]
    qtype = (args.target[2] if len(args.target) == 3 else "A").upper()
    try:
        text = Path(args.allowlist_file).read_text(encoding="utf-8")
        policy = parse_allowlist(text, source=f"file:{args.allowlist_file}")
        address: IPAddress | None = ipaddress.ip_address(args.address) if args.address else None
    except (OSError, UnicodeDecodeError) as err:
        print(f"egress-sidecar check: cannot read {args.allowlist_file}: {err}", file=sys.stderr)
        return 2
    except AllowlistError as err:
        print(f"egress-sidecar check: invalid allowlist:\n{err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"egress-sidecar check: {clip(err, 300)}", file=sys.stderr)
        return 2
    if args.resolve:
        print("egress-sidecar check: --resolve does not apply to the dns form", file=sys.stderr)
        return 2
    ranges = list(args.allow_private_range) + env_ranges()
    store = PolicyStore(Mode(args.mode) if args.mode else None)
    snap = store.set_policy(policy.with_extra_private_ranges(ranges))
    verdict = decide_query(snap, name, qtype, InternalNames.build(extra=args.internal_domain))
    decision = verdict.decision
    if address is not None and decision.permits and not verdict.internal:
        filtered = filter_addresses(snap, [address])
        if filtered.emptied:
            decision = apply_mode(answer_denial(filtered, verdict.name), snap.mode)
    answer = "forwarded" if decision.permits else "NXDOMAIN"
    fields = {
        "name": verdict.name,
        "type": qtype,
        "internal": verdict.internal,
        "address": str(address) if address else None,
        "answer": answer,
    }
    shown = "forwarded" if decision.permits else "answered NXDOMAIN"
    headline = f"{decision.verdict.value} dns {verdict.name} {qtype} ({shown})"
    return _report(args.json, decision, snap, headline, fields)


def _report(
    as_json: bool,
    decision: Decision,
    snap: Snapshot,
    headline: str,
    fields: Mapping[str, object],
    *,
    extra: Mapping[str, str] | None = None,
) -> int:
    """A decision as `check` prints it (JSON: the decision, ``fields``, the policy), and its
    exit status: 0 when it permits, else 1."""
    if as_json:
        print(
            json.dumps(
                {
                    "decision": decision.verdict.value,
                    "reason": decision.reason.value,
                    "rule": decision.rule,
                    "detail": decision.detail,
                    **fields,
                    "policy_source": snap.source,
                    "policy_version": snap.version,
                }
            )
        )
    else:
        print(headline)
        print(f"  reason: {decision.reason.value}")
        if decision.detail:
            print(f"  detail: {decision.detail}")
        print(f"  rule:   {decision.rule if decision.rule is not None else '-'}")
        for name, value in (extra or {}).items():
            print(f"  {name + ':':<7} {value}")
        print(f"  policy: {snap.source} version {snap.version} (mode {snap.mode.value})")
    return 0 if decision.permits else 1
