"""Results of one run and their Markdown table (pure: no I/O)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.loadgen import Download, LoadResult


@dataclass(frozen=True)
class Settings:
    seconds: int = 5  # wrk takes whole seconds
    latency_seconds: int = 3
    warmup_seconds: int = 1
    idle_seconds: float = 1.0  # after start-up, before the idle RSS is read
    connections: int = 16
    big_bytes: int = 100 * 1000 * 1000
    max_requests: int = 500_000  # per wrk run, on top of the time bound
    max_qps_per_worker: int = 2000  # hey: bounds the count of a time-bounded run


@dataclass(frozen=True)
class Direct:
    http: LoadResult
    latency: LoadResult
    new_tls: LoadResult
    keepalive_tls: LoadResult
    download: Download


@dataclass(frozen=True)
class ProxyRun:
    name: str
    http: LoadResult
    http_cpu_s: float
    latency: LoadResult
    new_tunnels: LoadResult
    new_tunnels_cpu_s: float
    long_tunnels: LoadResult
    download: Download
    download_cpu_s: float
    rss_idle_mib: float
    rss_peak_mib: float
    load_seconds: float  # wall time of all measured load
    cpu_wait_s: float  # runnable but not running during it (other processes on its core)

    @property
    def cpu_per_10k_http(self) -> float:
        return self.http_cpu_s / self.http.ok * 10_000 if self.http.ok else float("nan")

    @property
    def cpu_per_10k_tunnels(self) -> float:
        ok = self.new_tunnels.ok
        return self.new_tunnels_cpu_s / ok * 10_000 if ok else float("nan")

    @property
    def cpu_per_gb_tunnel(self) -> float:
        size = self.download.size
        return self.download_cpu_s / size * 1e9 if size else float("nan")

    @property
    def errors(self) -> int:
        return sum(
            r.errors for r in (self.http, self.latency, self.new_tunnels, self.long_tunnels)
        ) + (0 if self.download.status == 200 else 1)


@dataclass(frozen=True)
class Report:
    when: str
    machine: str
    upstream: str
    load: str
    pinning: str
    settings: Settings
    direct: Direct
    baseline: ProxyRun  # Squid
    sidecar: ProxyRun
    notes: list[str] = field(default_factory=list)


def _num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(ours: float, theirs: float) -> str:
    if theirs <= 0 or math.isnan(ours) or math.isnan(theirs):
        return "n/a"
    return f"{ours / theirs:.2f}x"


Row = tuple[str, str, float, float, int, str]  # label, direct, squid, ours, digits, better


def rows(report: Report) -> list[Row]:
    d, sq, us = report.direct, report.baseline, report.sidecar
    c = report.settings.connections
    mb = report.settings.big_bytes / 1e6

    def added(run: ProxyRun, pick: Callable[[LoadResult], float]) -> float:
        return pick(run.latency) - pick(d.latency)

    return [
        (f"HTTP keep-alive req/s, c={c}", _num(d.http.rate), sq.http.rate, us.http.rate, 0, "↑"),
        ("CPU-s per 10k HTTP requests", "-", sq.cpu_per_10k_http, us.cpu_per_10k_http, 2, "↓"),
        (
            f"new CONNECT tunnels/s, c={c}",
            _num(d.new_tls.rate),
            sq.new_tunnels.rate,
            us.new_tunnels.rate,
            0,
            "↑",
        ),
        (
            "CPU-s per 10k new tunnels",
            "-",
            sq.cpu_per_10k_tunnels,
            us.cpu_per_10k_tunnels,
            2,
            "↓",
        ),
        (
            f"long-lived tunnels req/s, c={c}",
            _num(d.keepalive_tls.rate),
            sq.long_tunnels.rate,
            us.long_tunnels.rate,
            0,
            "↑",
        ),
        (
            f"{mb:g} MB via one tunnel, MB/s",
            _num(d.download.mb_per_s),
            sq.download.mb_per_s,
            us.download.mb_per_s,
            0,
            "↑",
        ),
        (
            "CPU-s per GB through one tunnel",
            "-",
            sq.cpu_per_gb_tunnel,
            us.cpu_per_gb_tunnel,
            2,
            "↓",
        ),
        (
            "added p50 latency, c=1, ms",
            f"({_num(d.latency.p50_ms, 3)})",
            added(sq, lambda r: r.p50_ms),
            added(us, lambda r: r.p50_ms),
            3,
            "↓",
        ),
        (
            "added p99 latency, c=1, ms",
            f"({_num(d.latency.p99_ms, 3)})",
            added(sq, lambda r: r.p99_ms),
            added(us, lambda r: r.p99_ms),
            3,
            "↓",
        ),
        ("RSS idle, MiB", "-", sq.rss_idle_mib, us.rss_idle_mib, 1, "↓"),
        ("RSS peak under load, MiB", "-", sq.rss_peak_mib, us.rss_peak_mib, 1, "↓"),
    ]


def markdown(report: Report) -> str:
    sq, us = report.baseline, report.sidecar
    s = report.settings
    lines = [
        f"Run {report.when} on {report.machine}.",
        f"Upstream: {report.upstream}. Load: {report.load}. Pinning: {report.pinning}.",
        f"Each load scenario {s.seconds:g} s (latency {s.latency_seconds:g} s at c=1), "
        f"after {s.warmup_seconds:g} s of warm-up per proxy.",
        "",
        f"| scenario | direct (no proxy) | {sq.name} | {us.name} | sidecar ÷ Squid |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, direct, theirs, ours, digits, better in rows(report):
        lines.append(
            f"| {label} {better} | {direct} | {_num(theirs, digits)} | {_num(ours, digits)} "
            f"| {_ratio(ours, theirs)} |"
        )
    lines.append(f"| errors (non-2xx, socket) | - | {sq.errors} | {us.errors} | |")
    lines.append(
        "| proxy runnable but waiting for its CPU | - | "
        f"{_num(sq.cpu_wait_s, 1)} s of {_num(sq.load_seconds, 0)} s | "
        f"{_num(us.cpu_wait_s, 1)} s of {_num(us.load_seconds, 0)} s | |"
    )
    lines += [
        "",
        "↑ higher is better, ↓ lower is better. The direct column of the latency rows is the "
        "absolute latency without a proxy (the proxies' rows are what they add to it). "
        "The last row is noise from other processes on the proxy's core (scheduler "
        "statistics): rates and latencies suffer from it, CPU-seconds per request do not.",
    ]
    if report.notes:
        lines += ["", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"
