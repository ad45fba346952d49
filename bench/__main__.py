"""`python -m bench`: see bench/__init__.py and docs/benchmark.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.loadgen import LoadError
from bench.report import Settings, markdown, to_json
from bench.runner import run
from bench.servers import ServerError
from bench.tools import MissingToolsError, find_tools


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark egress-sidecar against Squid on loopback: plain-HTTP keep-alive "
        "req/s, new CONNECT tunnels/s, long-lived tunnels req/s, one big download through a "
        "tunnel, added latency at c=1, RSS and CPU per 10k requests, RSS per idle tunnel, and "
        "CPU per 10k requests and new tunnels again with both proxies up and loaded in turn "
        "(the firmer ratio on a noisy machine); and "
        "for the sidecar alone: span export on, transparent capture in network namespaces "
        "(root), a large allowlist, DNS queries/s and added latency per query through the DNS "
        "listener against direct (root). Long-lived tunnels and the big download carry plain "
        "HTTP, so that the proxy bounds them (rows with TLS inside follow). Needs squid, nginx, "
        "wrk, hey, curl and a C compiler for the bench's own tunnel load generator, "
        "bench/tunload.c (Debian: apt-get install squid nginx-light wrk hey curl gcc). A full "
        "run takes about 5 minutes; it prints Markdown tables and writes them to --out, and "
        "the figures as JSON to --json.",
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
    p.add_argument(
        "--idle-connections",
        type=int,
        default=d.idle_connections,
        help="idle CONNECT tunnels held at once per proxy; 0 skips (default %(default)s)",
    )
    p.add_argument(
        "--rules",
        type=int,
        default=d.rules,
        help="host rules of the large allowlist; 0 skips (default %(default)s)",
    )
    p.add_argument(
        "--allowlist-edits",
        type=int,
        default=d.allowlist_edits,
        help="reloads of the large allowlist after its load, one host renamed each time, with "
        "the sidecar's RSS after them; 0 skips (default %(default)s)",
    )
    p.add_argument(
        "--no-transparent",
        action="store_true",
        help="skip the transparent-capture scenario (network namespaces, needs root)",
    )
    p.add_argument(
        "--sidecar-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the sidecar from this image root filesystem (chroot: the image's interpreter "
        "and code, as a pod runs it) instead of this venv's; `make bench-image` builds the "
        "image, mounts it and passes this. Implies --no-transparent and --no-dns (root)",
    )
    p.add_argument(
        "--no-dns",
        action="store_true",
        help="skip the DNS listener's scenario (a test server on port 53, needs root)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(".bench/results.md"),
        help="where to write the Markdown table (default %(default)s)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=Path(".bench/results.json"),
        help="where to write the figures as JSON (default %(default)s)",
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
        idle_connections=args.idle_connections,
        rules=args.rules,
        allowlist_edits=args.allowlist_edits,
        transparent=not args.no_transparent and args.sidecar_root is None,
        dns=not args.no_dns and args.sidecar_root is None,
        sidecar_root=args.sidecar_root,
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n")
    log(f"table written to {args.out}, figures to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
