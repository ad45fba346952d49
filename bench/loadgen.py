"""Load generators (wrk, hey, curl, our tunload) run as bounded subprocesses, and parsers of what
they print."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.configs import LOOPBACK, wrk_script


class LoadError(RuntimeError):
    """A load generator failed or printed something we cannot read; the message has its output."""


@dataclass(frozen=True)
class LoadResult:
    ok: int  # successful (2xx) responses
    errors: int  # non-2xx responses and socket errors/timeouts
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Download:
    status: int
    size: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0


def checked(what: str, result: LoadResult, notes: list[str]) -> LoadResult:
    """``result``, failing the run when nothing succeeded and noting an error rate over 0.1 %."""
    total = result.ok + result.errors
    if result.ok == 0:
        raise RuntimeError(f"{what}: no successful response ({result.errors} errors)")
    if result.errors and result.errors / total > 0.001:
        notes.append(f"{what}: {result.errors} of {total} requests failed")
    return result


_WRK_LINE = re.compile(r"^BENCH-WRK (.*)$", re.MULTILINE)


def parse_wrk(stdout: str) -> LoadResult:
    match = _WRK_LINE.search(stdout)
    if not match:
        raise LoadError(f"wrk printed no BENCH-WRK line:\n{stdout[-2000:]}")
    kv = {k: float(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}
    errors = int(kv["connect"] + kv["read"] + kv["write"] + kv["status"] + kv["timeout"])
    requests = int(kv["requests"])
    return LoadResult(
        ok=max(requests - int(kv["status"]), 0),
        errors=errors,
        seconds=kv["duration_us"] / 1e6,
        p50_ms=kv["p50_us"] / 1e3,
        p99_ms=kv["p99_us"] / 1e3,
    )


_HEY_TOTAL = re.compile(r"^\s*Total:\s+([\d.]+) secs", re.MULTILINE)
_HEY_PCT = re.compile(r"^\s*(\d+)% in ([\d.]+) secs", re.MULTILINE)
_HEY_STATUS = re.compile(r"^\s*\[(\d{3})\]\s+(\d+) responses", re.MULTILINE)
_HEY_ERRORS = re.compile(r"^\s*\[(\d+)\]\s+\D", re.MULTILINE)


def parse_hey(stdout: str) -> LoadResult:
    total = _HEY_TOTAL.search(stdout)
    if not total:
        raise LoadError(f"hey printed no 'Total:' line:\n{stdout[-2000:]}")
    statuses = {int(code): int(n) for code, n in _HEY_STATUS.findall(stdout)}
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    bad_status = sum(n for code, n in statuses.items() if not 200 <= code < 300)
    _, _, error_part = stdout.partition("Error distribution:")
    errors = sum(int(n) for n in _HEY_ERRORS.findall(error_part))
    pct = {int(p): float(s) * 1e3 for p, s in _HEY_PCT.findall(stdout)}
    return LoadResult(
        ok=ok,
        errors=bad_status + errors,
        seconds=float(total.group(1)),
        p50_ms=pct.get(50, 0.0),
        p99_ms=pct.get(99, 0.0),
    )


def parse_curl(stdout: str) -> Download:
    try:
        status, size, seconds = stdout.split()
        return Download(int(status), int(size), float(seconds))
    except ValueError as err:
        raise LoadError(f"curl -w printed {stdout!r}") from err


_TUNLOAD_LINE = re.compile(r"^BENCH-TUNLOAD (.*)$", re.MULTILINE)


def parse_tunload(stdout: str) -> LoadResult:
    match = _TUNLOAD_LINE.search(stdout)
    if not match:
        raise LoadError(f"tunload printed no BENCH-TUNLOAD line:\n{stdout[-2000:]}")
    try:
        kv = {k: float(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}
        return LoadResult(
            ok=int(kv["ok"]),
            errors=int(kv["status"]),
            seconds=kv["seconds"],
            p50_ms=kv["p50_ms"],
            p99_ms=kv["p99_ms"],
        )
    except (KeyError, ValueError) as err:
        raise LoadError(f"tunload printed an unreadable line: {match.group(0)!r}") from err


TUNLOAD_SOURCE = Path(__file__).with_name("tunload.c")


def build_tunload(cc: str, workdir: Path) -> Path:
    """Compile ``tunload.c`` (beside this module) into ``workdir``; its path."""
    out = workdir / "tunload"
    argv = [cc, "-O2", "-Wall", "-o", str(out), str(TUNLOAD_SOURCE)]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return out


def clean_env() -> dict[str, str]:
    """The environment without proxy variables (the proxy is always given explicitly)."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop}


def _run(argv: Sequence[str], timeout: float, env: Mapping[str, str]) -> str:
    try:
        done = subprocess.run(
            list(argv), check=False, capture_output=True, text=True, timeout=timeout, env=dict(env)
        )
    except subprocess.TimeoutExpired as err:
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f} s: {argv}") from err
    if done.returncode != 0:
        raise LoadError(f"{argv} exited {done.returncode}:\n{done.stdout[-1000:]}{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Generators:
    wrk: str
    hey: str
    curl: str
    prefix: tuple[str, ...]  # e.g. taskset -c 1
    workdir: Path
    tunload: Path | None = None  # build_tunload's program; only the scenarios that use it need it

    def wrk_http(
        self,
        *,
        upstream_port: int,
        proxy_port: int | None,
        connections: int,
        seconds: int,
        limit: int,
        address: str = LOOPBACK,
        name: str | None = None,
    ) -> LoadResult:
        """Plain-HTTP keep-alive GETs; absolute-form to the proxy, origin-form when direct.

        wrk connects to ``address`` (the proxy's when proxied, else the upstream's); the
        request names ``name`` (default: the upstream's address) in its target and Host.
        """
        host = f"{name or address}:{upstream_port}"
        target_port = proxy_port if proxy_port is not None else upstream_port
        url = f"http://{host}/" if proxy_port is not None else "/"
        script = self.workdir / f"wrk-{target_port}-{connections}-{name or address}.lua"
        script.write_text(wrk_script(url=url, host=host, limit=max(limit, 1)))
        argv = [
            *self.prefix,
            self.wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(seconds, 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://{address}:{target_port}/",
        ]
        return parse_wrk(_run(argv, seconds + 30, clean_env()))

    def hey_https(
        self,
        *,
        upstream_port: int,
        proxy_port: int | None,
        connections: int,
        seconds: int,
        new_connection_each: bool,
        max_qps_per_worker: int,
        address: str = LOOPBACK,
        name: str | None = None,
    ) -> LoadResult:
        """HTTPS GETs (CONNECT tunnels when proxied) to ``address``, time-bounded; count bounded
        by -q. ``name``: hey's -host, which it sends as the Host header and as the TLS SNI."""
        argv = [
            *self.prefix,
            self.hey,
            "-cpus",
            "1",
            "-c",
            str(connections),
            "-z",
            f"{max(seconds, 1)}s",
            "-q",
            str(max_qps_per_worker),
            "-t",
            "10",
        ]
        if proxy_port is not None:
            argv += ["-x", f"http://{LOOPBACK}:{proxy_port}"]
        if new_connection_each:
            argv.append("-disable-keepalive")
        if name is not None:
            argv += ["-host", name]
        argv.append(f"https://{address}:{upstream_port}/")
        return parse_hey(_run(argv, seconds + 40, clean_env()))

    def tunnel_http(
        self,
        *,
        upstream_port: int,
        proxy_port: int | None,
        connections: int,
        seconds: int,
        limit: int,
    ) -> LoadResult:
        """Plain HTTP keep-alive GETs inside long-lived CONNECT tunnels through the proxy at
        ``proxy_port`` (straight to the upstream when None), time- and count-bounded; the
        clock starts once every tunnel is open."""
        if self.tunload is None:
            raise LoadError("tunload was not built (build_tunload)")
        target = f"{LOOPBACK}:{upstream_port}"
        proxy = f"{LOOPBACK}:{proxy_port}" if proxy_port is not None else "-"
        argv = [
            *self.prefix,
            str(self.tunload),
            proxy,
            target,
            "/",
            str(connections),
            str(max(seconds, 1)),
            str(max(limit, 1)),
        ]
        return parse_tunload(_run(argv, seconds + 30, clean_env()))

    def curl_download(
        self, *, url: str, proxy_port: int | None, max_seconds: float, tunnel: bool = False
    ) -> Download:
        """One GET of ``url`` to /dev/null. ``tunnel``: through a CONNECT tunnel even for an
        http:// URL (curl --proxytunnel), so the proxy relays the bytes untouched."""
        argv = [
            *self.prefix,
            self.curl,
            "--silent",
            "--show-error",
            "--insecure",
            "--output",
            "/dev/null",
            "--max-time",
            f"{max_seconds:.0f}",
            "--write-out",
            "%{http_code} %{size_download} %{time_total}",
        ]
        if proxy_port is not None:
            argv += ["--proxy", f"http://{LOOPBACK}:{proxy_port}", "--noproxy", ""]
            if tunnel:
                argv.append("--proxytunnel")
        else:
            argv += ["--noproxy", "*"]
        argv.append(url)
        return parse_curl(_run(argv, max_seconds + 10, clean_env()))
