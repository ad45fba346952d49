"""`python -m bench`: see bench/__init__.py and docs/benchmark.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.loadgen import LoadError
from bench.report import Settings, markdown
from bench.runner import run
from bench.servers import ServerError
from bench.tools import MissingToolsError, find_tools


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark egress-sidecar against Squid on loopback: plain-HTTP keep-alive "
        "req/s, new CONNECT tunnels/s, long-lived tunnels req/s, one big download through a "
        "tunnel, added latency at c=1, RSS and CPU per 10k requests. Needs squid, nginx, wrk, "
        "hey and curl (Debian: apt-get install squid nginx-light wrk hey curl). A full run "
        "takes about 1.5 minutes; it prints a Markdown table and writes it to --out.",
    )
    p.add_argument(
        "--seconds",
        type=int,
        default=d.seconds,
        help="length of each load scenario (default %(default)s)",
    )
    p.add_argument(
        "--latency-seconds",
        type=int,
        default=d.latency_seconds,
        help="length of the c=1 latency runs (default %(default)s)",
    )
    p.add_argument(
        "--warmup-seconds",
        type=int,
        default=d.warmup_seconds,
        help="plain-HTTP warm-up per proxy, not measured (default %(default)s)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=d.idle_seconds,
        help="pause after a proxy is ready, before its idle RSS is read (default %(default)s)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=d.connections,
        help="concurrency of the load scenarios (default %(default)s)",
    )
    p.add_argument(
        "--big-mb",
        type=float,
        default=d.big_bytes / 1e6,
        help="size of the one-tunnel download in MB (default %(default)g)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=d.max_requests,
        help="count bound of each wrk run, on top of its time bound (default %(default)s)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(".bench/results.md"),
        help="where to write the Markdown table (default %(default)s)",
    )
    p.add_argument(
        "--keep-workdir", action="store_true", help="keep configs and logs (path is printed)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        tools = find_tools()
    except MissingToolsError as err:
        print(err, file=sys.stderr)
        return 2
    settings = Settings(
        seconds=args.seconds,
        latency_seconds=args.latency_seconds,
        warmup_seconds=args.warmup_seconds,
        idle_seconds=args.idle_seconds,
        connections=args.connections,
        big_bytes=int(args.big_mb * 1e6),
        max_requests=args.max_requests,
    )

    def log(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    try:
        report = run(tools, settings, pin=not args.no_pin, keep_workdir=args.keep_workdir, log=log)
    except (ServerError, LoadError, RuntimeError) as err:
        print(f"bench: failed: {err}", file=sys.stderr)
        return 1
    table = markdown(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    log(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
