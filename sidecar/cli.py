"""`egress-sidecar`: run the proxy, check a destination, validate an allowlist, manage iptables.

Each subcommand lives in its own module with ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (args -> exit code). Modules are imported here, but each keeps its
heavy imports (mitmproxy, kubernetes) inside its ``func`` so that `egress-sidecar iptables` in the
init container starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar.commands import check, run, validate
from sidecar.iptables import cli as iptables_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-sidecar",
        description=(
            "Per-pod egress allowlist proxy for Kubernetes. Every outbound HTTP(S) call is checked "
            "against an allowlist, allowed or blocked, and traced with OpenTelemetry."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run.add_parser(sub)
    check.add_parser(sub)
    validate.add_parser(sub)
    iptables_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
