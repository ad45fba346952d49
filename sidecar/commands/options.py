"""Command-line options shared by `run` and `check`, with their environment fallbacks."""

from __future__ import annotations

import argparse
import ipaddress
import os

from sidecar import contract
from sidecar.policy.model import IPNetwork


def cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR network: {err}") from None


def env_ranges() -> list[IPNetwork]:
    raw = os.environ.get(contract.ENV_ALLOW_PRIVATE_RANGES, "")
    return [cidr(part) for part in raw.split(",") if part.strip()]


def add_policy_options(
    parser: argparse.ArgumentParser,
    *,
    file_required: bool,
    file_group: argparse._ArgumentGroup | None = None,
) -> None:
    (file_group or parser).add_argument(
        "--allowlist-file",
        metavar="PATH",
        required=file_required,
        default=None if file_required else os.environ.get(contract.ENV_ALLOWLIST_FILE),
        help="an allowlist document, or a ConfigMap manifest whose data key allowlist.yaml holds "
        "one"
        + (
            ""
            if file_required
            else f"; hot-reloaded, also as a mounted ConfigMap (env {contract.ENV_ALLOWLIST_FILE})"
        ),
    )
    parser.add_argument(
        "--allow-private-range",
        metavar="CIDR",
        type=cidr,
        action="append",
        default=[],
        help="a non-public range that host rules may reach, as privateRanges in the allowlist "
        f"(repeatable; env {contract.ENV_ALLOW_PRIVATE_RANGES}, comma-separated)",
    )
    parser.add_argument(
        "--mode",
        choices=["enforce", "audit"],
        default=os.environ.get(contract.ENV_MODE) or None,
        help="enforce (deny what no rule allows) or audit (decide, trace and log, but let "
        "everything through); default: the allowlist's own `mode:`, else enforce "
        f"(env {contract.ENV_MODE})",
    )
