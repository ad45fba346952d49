"""`egress-sidecar validate FILE...`: every problem of every file, exit 1 if any."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sidecar.policy.errors import AllowlistError
from sidecar.policy.parse import load_allowlist


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "validate",
        help="check allowlist files without running anything",
        description="Validate allowlist documents or ConfigMap manifests (key allowlist.yaml). "
        "Prints every problem with its line, and warnings (e.g. a very wide CIDR) marked "
        "'warning:'; exits 0 when all files are valid (warnings or not), 1 when any is invalid, "
        "2 when a file cannot be read.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="a file, or - for stdin")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    worst = 0
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            print(f"{name}: cannot read: {err}", file=sys.stderr)
            worst = 2
            continue
        try:
            parsed = load_allowlist(text, source=f"file:{name}")
        except AllowlistError as err:
            for problem in err.problems:
                where = f"{name}:{problem.line}" if problem.line is not None else name
                print(f"{where}: {problem.message}")
            print(f"{name}: invalid ({len(err.problems)} problem(s))", file=sys.stderr)
            worst = max(worst, 1)
            continue
        for warning in parsed.warnings:
            where = f"{name}:{warning.line}" if warning.line is not None else name
            print(f"{where}: warning: {warning.message}")
        policy = parsed.policy
        print(f"{name}: valid ({policy.rule_count} rules, version {policy.meta.version})")
    return worst
