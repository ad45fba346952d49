"""`python -m bench.soak` (`make soak`, `SOAK_ARGS="--duration 30"` for a quick run)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from bench.servers import ServerError
from bench.soak.model import Tolerance, render
from bench.soak.runner import Settings, SidecarDiedError, SoakError, run


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not an integer > 0")
    return value


def parser() -> argparse.ArgumentParser:
    d, t = Settings(), Tolerance()
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Soak the sidecar on loopback: concurrent clients send plain-HTTP GETs and "
        "CONNECT + TLS + GET through it to an nginx upstream, for host names allowed by both "
        "allowlist versions, by A only, by B only and by neither, while the allowlist file "
        "flips between A and B. Every decision is checked against the version that made it; "
        "the sidecar's RSS and open fds are sampled every second. Exit 1 when a decision is "
        "wrong, the resources do not come back to the baseline or the sidecar dies; 2 when the "
        "soak cannot run. "
        "Needs nginx and unshare (Debian: nginx-light, util-linux), and root (mount namespace).",
    )
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=d.seconds,
        help="seconds of measured load (default %(default)g)",
    )
    p.add_argument(
        "--clients",
        type=_positive_int,
        default=d.clients,
        help="concurrent clients (default %(default)s)",
    )
    p.add_argument(
        "--flip-interval",
        type=_positive_float,
        default=d.flip_interval,
        help="seconds between allowlist flips (default %(default)g)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=d.warmup_seconds,
        help="seconds of unjudged load before the baseline is taken (default %(default)g)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=d.settle_seconds,
        help="pause before the baseline and after the load, before the end sample "
        "(default %(default)g)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=d.timeout,
        help="per-request timeout in seconds (default %(default)g)",
    )
    p.add_argument(
        "--max-requests",
        type=_positive_int,
        default=d.max_requests,
        help="count bound on top of the time bound (default %(default)s)",
    )
    p.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=t.rss_mib,
        help="RSS may end this many MiB above the baseline... (default %(default)g)",
    )
    p.add_argument(
        "--rss-tolerance-fraction",
        type=float,
        default=t.rss_fraction,
        help="...or this fraction of it, whichever is larger (default %(default)g)",
    )
    p.add_argument(
        "--fd-tolerance",
        type=int,
        default=t.fds,
        help="open fds may end this many above the baseline (default %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(".bench/soak-results.json"),
        help="where to write the JSON report (default %(default)s)",
    )
    p.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep configs, the decision log and the sidecar's stderr (path printed)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings(
        seconds=args.duration,
        clients=args.clients,
        flip_interval=args.flip_interval,
        warmup_seconds=max(args.warmup, 0.0),
        settle_seconds=max(args.settle, 0.0),
        timeout=args.timeout,
        max_requests=args.max_requests,
        tolerance=Tolerance(args.rss_tolerance_mib, args.rss_tolerance_fraction, args.fd_tolerance),
    )

    # SIGTERM (timeout(1), a CI cancel) unwinds like Ctrl-C: the sidecar and nginx are stopped.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(msg: str) -> None:
        print(f"soak: {msg}", file=sys.stderr, flush=True)

    try:
        report = run(settings, keep_workdir=args.keep_workdir, log=log)
    except SidecarDiedError as err:
        print(f"soak: FAIL: {err}", file=sys.stderr)
        return 1
    except (SoakError, ServerError) as err:
        print(f"soak: cannot run: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render(report), end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    log(f"JSON report written to {args.out}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
