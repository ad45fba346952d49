"""Results of one run and their Markdown table (pure: no I/O)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.idle import IdleResult
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
    idle_connections: int = 2000  # idle CONNECT tunnels held at once, per proxy
    rules: int = 10_000  # host rules of the large allowlist
    allowlist_edits: int = 8  # reloads of it, one host renamed each time
    transparent: bool = True  # the network-namespace scenario (root)
    dns: bool = True  # the DNS listener's scenario (root: a test server on port 53)
    # An image's root filesystem: the sidecar runs from it (chroot), the image's interpreter and
    # code, as in a pod (None: this venv's sidecar).
    sidecar_root: Path | None = None


@dataclass(frozen=True)
class Direct:
    http: LoadResult
    latency: LoadResult
    new_tls: LoadResult
    long: LoadResult  # plain HTTP, keep-alive (tunload), as in the proxies' long-lived tunnels
    keepalive_tls: LoadResult
    download: Download  # plain HTTP (curl)
    download_tls: Download


@dataclass(frozen=True)
class ProxyRun:
    name: str
    http: LoadResult
    http_cpu_s: float
    latency: LoadResult
    new_tunnels: LoadResult
    new_tunnels_cpu_s: float
    long_tunnels: LoadResult  # plain HTTP inside (tunload)
    long_tls_tunnels: LoadResult  # TLS inside (hey)
    download: Download  # plain HTTP inside the tunnel
    download_cpu_s: float
    download_tls: Download  # TLS inside
    rss_idle_mib: float
    rss_peak_mib: float  # during the load scenarios above
    load_seconds: float  # wall time of all measured load
    cpu_wait_s: float  # runnable but not running during it (other processes on its core)
    idle: IdleResult | None = None  # idle tunnels held after the load scenarios
    rss_peak_all_mib: float = 0.0  # through every phase of this process, idle tunnels included

    @property
    def cpu_per_10k_http(self) -> float:
        return self.http_cpu_s / self.http.ok * 10_000 if self.http.ok else float("nan")

    @property
    def cpu_per_10k_tunnels(self) -> float:
        ok = self.new_tunnels.ok
        return self.new_tunnels_cpu_s / ok * 10_000 if ok else float("nan")

    @property
    def cpu_per_gb_tunnel(self) -> float:
        return cpu_per_gb(self.download_cpu_s, (self.download,))

    @property
    def errors(self) -> int:
        loads = (
            self.http,
            self.latency,
            self.new_tunnels,
            self.long_tunnels,
            self.long_tls_tunnels,
        )
        return sum(r.errors for r in loads) + sum(
            d.status != 200 for d in (self.download, self.download_tls)
        )


def per_10k(cpu_s: float, result: LoadResult) -> float:
    return cpu_s / result.ok * 10_000 if result.ok else float("nan")


@dataclass(frozen=True)
class ExportRun:
    """The plain-HTTP keep-alive scenario on a sidecar exporting its spans (OTLP
    http/protobuf) to the bench's receiver, CPU counted until the receiver had them all, and on
    one exporting nothing, in alternating segments."""

    http: LoadResult
    cpu_s: float
    off: LoadResult
    off_cpu_s: float
    spans: int  # received by the receiver for the measured segments
    requests: int  # the measured segments' requests (answered or failed)
    flush_s: float  # longest wait from a segment's end until its last span arrived
    rss_idle_mib: float
    rss_peak_mib: float
    off_rss_idle_mib: float
    off_rss_peak_mib: float

    @property
    def cpu_per_10k(self) -> float:
        return per_10k(self.cpu_s, self.http)

    @property
    def off_cpu_per_10k(self) -> float:
        return per_10k(self.off_cpu_s, self.off)


@dataclass(frozen=True)
class LoadCoreBusy:
    """How busy the load generators' core was (0 to 1) while a proxy was loaded in turn, per
    scenario; NaN where nothing was pinned. Near 1, the rate read is what the load generators
    and the upstream could do on their core, and a proxy moves it only through what it makes
    them do (how many wake-ups its writes cost them), not through its own speed."""

    http: float
    tunnels: float
    long: float
    download: float


@dataclass(frozen=True)
class Alternating:
    """The two CPU targets measured again with Squid and the sidecar running side by side on
    the proxy's core and loaded in turn (Squid, sidecar, sidecar, Squid; each segment as long
    as a scenario): whatever else loads the machine meanwhile weighs on both alike, so the ratio is
    firmer than the main table's, whose proxies ran minutes apart."""

    squid_http: LoadResult
    squid_http_cpu_s: float
    http: LoadResult
    http_cpu_s: float
    squid_tunnels: LoadResult
    squid_tunnels_cpu_s: float
    tunnels: LoadResult
    tunnels_cpu_s: float
    # Long-lived tunnels (plain HTTP keep-alive inside, tunload), in the same order.
    squid_long: LoadResult
    squid_long_cpu_s: float
    long: LoadResult
    long_cpu_s: float
    # The big download through one tunnel, a few times per segment: one download lasts a
    # fraction of a second, so a single one per proxy reads mostly the machine's mood.
    squid_downloads: tuple[Download, ...]
    squid_downloads_cpu_s: float
    downloads: tuple[Download, ...]
    downloads_cpu_s: float
    rss_peak_mib: float  # the sidecar's, through these rounds
    squid_load_core: LoadCoreBusy
    load_core: LoadCoreBusy

    def proxy_core(self, squid: bool) -> LoadCoreBusy:
        """The proxy's own CPU over its segments, a share of its one core: near 1, the proxy
        was the bound; the shares of the four scenarios, as in LoadCoreBusy."""
        if squid:
            return LoadCoreBusy(
                _share(self.squid_http_cpu_s, self.squid_http.seconds),
                _share(self.squid_tunnels_cpu_s, self.squid_tunnels.seconds),
                _share(self.squid_long_cpu_s, self.squid_long.seconds),
                _share(self.squid_downloads_cpu_s, sum(d.seconds for d in self.squid_downloads)),
            )
        return LoadCoreBusy(
            _share(self.http_cpu_s, self.http.seconds),
            _share(self.tunnels_cpu_s, self.tunnels.seconds),
            _share(self.long_cpu_s, self.long.seconds),
            _share(self.downloads_cpu_s, sum(d.seconds for d in self.downloads)),
        )

    @property
    def squid_download_mb_per_s(self) -> float:
        return mb_per_s(self.squid_downloads)

    @property
    def download_mb_per_s(self) -> float:
        return mb_per_s(self.downloads)

    @property
    def squid_cpu_per_gb(self) -> float:
        return cpu_per_gb(self.squid_downloads_cpu_s, self.squid_downloads)

    @property
    def cpu_per_gb(self) -> float:
        return cpu_per_gb(self.downloads_cpu_s, self.downloads)


def _share(cpu_s: float, seconds: float) -> float:
    return cpu_s / seconds if seconds > 0 else float("nan")


def mb_per_s(downloads: tuple[Download, ...]) -> float:
    """The downloads as one: their bytes over their time (NaN when none completed)."""
    seconds = sum(d.seconds for d in downloads)
    return sum(d.size for d in downloads) / 1e6 / seconds if seconds > 0 else float("nan")


def cpu_per_gb(cpu_s: float, downloads: tuple[Download, ...]) -> float:
    size = sum(d.size for d in downloads)
    return cpu_s / size * 1e9 if size else float("nan")


@dataclass(frozen=True)
class TransparentRun:
    """Plain HTTP keep-alive and new TLS connections captured by iptables REDIRECT."""

    http: LoadResult
    http_cpu_s: float
    new_tls: LoadResult
    new_tls_cpu_s: float
    rss_idle_mib: float
    rss_peak_mib: float
    decisions: int  # decision lines the sidecar logged (proof that it, not a bypass, served)


@dataclass(frozen=True)
class DnsRun:
    """UDP queries to the DNS listener (bench.dns): forwarded (an allowed name) and answered by
    the sidecar itself (NXDOMAIN for an unlisted name), against the server asked directly."""

    direct: LoadResult
    allowed: LoadResult
    allowed_cpu_s: float
    denied: LoadResult
    denied_cpu_s: float
    direct_latency: LoadResult  # c=1
    latency: LoadResult  # c=1, through the sidecar, allowed name
    rss_idle_mib: float
    rss_peak_mib: float


@dataclass(frozen=True)
class RulesRun:
    """The plain-HTTP scenario to a named host, allowed by a one-rule allowlist and by one rule
    of ``rules`` (two sidecar processes, the same load in alternating segments)."""

    rules: int
    small: LoadResult
    small_cpu_s: float
    large: LoadResult
    large_cpu_s: float
    small_rss_idle_mib: float
    small_rss_peak_mib: float
    large_rss_idle_mib: float
    large_rss_peak_mib: float
    # After ``edits`` reloads of the large allowlist, and the highest through them.
    edits: int = 0
    large_rss_edited_mib: float = 0.0
    large_rss_edit_peak_mib: float = 0.0


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
    export: ExportRun | None = None
    transparent: TransparentRun | None = None
    rules: RulesRun | None = None
    dns: DnsRun | None = None
    notes: list[str] = field(default_factory=list)
    alternating: Alternating | None = None

    def sidecar_peak_mib(self) -> float:
        """The highest RSS of any sidecar process in the run, whatever the scenario."""
        peaks = [self.sidecar.rss_peak_all_mib, self.sidecar.rss_peak_mib]
        if self.export is not None:
            peaks += [self.export.rss_peak_mib, self.export.off_rss_peak_mib]
        if self.transparent is not None:
            peaks.append(self.transparent.rss_peak_mib)
        if self.rules is not None:
            peaks += [
                self.rules.small_rss_peak_mib,
                self.rules.large_rss_peak_mib,
                self.rules.large_rss_edit_peak_mib,
            ]
        if self.dns is not None:
            peaks.append(self.dns.rss_peak_mib)
        if self.alternating is not None:
            peaks.append(self.alternating.rss_peak_mib)
        return max(peaks)


def _num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(ours: float, theirs: float) -> str:
    if theirs <= 0 or math.isnan(ours) or math.isnan(theirs):
        return "n/a"
    return f"{ours / theirs:.2f}x"


Row = tuple[str, str, float, float, int, str]  # label, direct, squid, ours, digits, better


ALTERNATING = "both running, loaded in turn"


def _alternating_rows(report: Report) -> list[Row]:
    a = report.alternating
    if a is None:
        return []
    return [
        (
            f"CPU-s per 10k HTTP requests, {ALTERNATING}",
            "-",
            per_10k(a.squid_http_cpu_s, a.squid_http),
            per_10k(a.http_cpu_s, a.http),
            2,
            "↓",
        ),
        (
            f"CPU-s per 10k new tunnels, {ALTERNATING}",
            "-",
            per_10k(a.squid_tunnels_cpu_s, a.squid_tunnels),
            per_10k(a.tunnels_cpu_s, a.tunnels),
            2,
            "↓",
        ),
    ]


def _alternating_one_tunnel_rows(report: Report) -> list[Row]:
    a = report.alternating
    if a is None:
        return []
    c = report.settings.connections
    mb = report.settings.big_bytes / 1e6
    return [
        (
            f"long-lived tunnels req/s, c={c}, {ALTERNATING}",
            "-",
            a.squid_long.rate,
            a.long.rate,
            0,
            "↑",
        ),
        (
            f"CPU-s per 10k requests in long-lived tunnels, {ALTERNATING}",
            "-",
            per_10k(a.squid_long_cpu_s, a.squid_long),
            per_10k(a.long_cpu_s, a.long),
            2,
            "↓",
        ),
        (
            f"{mb:g} MB via one tunnel, MB/s, {ALTERNATING} ({len(a.downloads)} each)",
            "-",
            a.squid_download_mb_per_s,
            a.download_mb_per_s,
            0,
            "↑",
        ),
        (
            f"CPU-s per GB through one tunnel, {ALTERNATING}",
            "-",
            a.squid_cpu_per_gb,
            a.cpu_per_gb,
            2,
            "↓",
        ),
    ]


def rows(report: Report) -> list[Row]:
    d, sq, us = report.direct, report.baseline, report.sidecar
    c = report.settings.connections
    mb = report.settings.big_bytes / 1e6

    def added(run: ProxyRun, pick: Callable[[LoadResult], float]) -> float:
        return pick(run.latency) - pick(d.latency)

    out: list[Row] = [
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
            _num(d.long.rate),
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
            f"long-lived TLS tunnels req/s (hey), c={c}",
            _num(d.keepalive_tls.rate),
            sq.long_tls_tunnels.rate,
            us.long_tls_tunnels.rate,
            0,
            "↑",
        ),
        (
            f"{mb:g} MB via one tunnel, TLS inside, MB/s",
            _num(d.download_tls.mb_per_s),
            sq.download_tls.mb_per_s,
            us.download_tls.mb_per_s,
            0,
            "↑",
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
        (
            f"RSS with {report.settings.idle_connections:,} idle tunnels, MiB",
            "-",
            sq.idle.rss_held_mib if sq.idle else math.nan,
            us.idle.rss_held_mib if us.idle else math.nan,
            1,
            "↓",
        ),
        (
            "RSS per idle tunnel, KiB",
            "-",
            sq.idle.kib_per_connection if sq.idle else math.nan,
            us.idle.kib_per_connection if us.idle else math.nan,
            1,
            "↓",
        ),
        (
            "RSS peak through the whole bench, MiB",
            "-",
            sq.rss_peak_all_mib,
            report.sidecar_peak_mib(),
            1,
            "↓",
        ),
    ]
    # the firmer ratios beside the main table's
    after = next(n for n, row in enumerate(out) if row[0] == "CPU-s per GB through one tunnel") + 1
    out[after:after] = _alternating_one_tunnel_rows(report)
    after = next(n for n, row in enumerate(out) if row[0] == "CPU-s per 10k new tunnels") + 1
    out[after:after] = _alternating_rows(report)
    return out


SidecarRow = tuple[str, str, str, str]  # label, sidecar, what it is compared with, ratio


def _pair(a: float, b: float) -> str:
    return f"{_num(a, 1)} / {_num(b, 1)}"


def sidecar_rows(report: Report) -> list[SidecarRow]:
    """Scenarios Squid has no counterpart for here, each against the sidecar's own reference
    figure (ratios: this scenario ÷ the reference)."""
    us, c = report.sidecar, report.settings.connections
    out: list[SidecarRow] = []

    def row(label: str, ours: float, ref: float, ref_label: str, digits: int) -> SidecarRow:
        return (label, _num(ours, digits), f"{_num(ref, digits)} ({ref_label})", _ratio(ours, ref))

    e = report.export
    if e is not None:
        off = "export off, same rounds"
        out += [
            row(
                "CPU-s per 10k HTTP requests, span export on ↓",
                e.cpu_per_10k,
                e.off_cpu_per_10k,
                off,
                2,
            ),
            row(f"HTTP keep-alive req/s, c={c}, span export on ↑", e.http.rate, e.off.rate, off, 0),
            (
                "spans received by the OTLP receiver",
                f"{e.spans:,} of {e.requests:,} requests",
                f"last one {e.flush_s:.1f} s after the load",
                "",
            ),
            (
                "RSS idle / peak, MiB, span export on ↓",
                _pair(e.rss_idle_mib, e.rss_peak_mib),
                f"{_pair(e.off_rss_idle_mib, e.off_rss_peak_mib)} (export off)",
                "",
            ),
        ]
    t = report.transparent
    if t is not None:
        out += [
            row(
                f"transparent HTTP keep-alive req/s, c={c} ↑",
                t.http.rate,
                us.http.rate,
                "explicit proxy",
                0,
            ),
            row(
                "CPU-s per 10k transparent HTTP requests ↓",
                per_10k(t.http_cpu_s, t.http),
                us.cpu_per_10k_http,
                "explicit proxy",
                2,
            ),
            row(
                f"transparent new TLS connections/s, c={c} ↑",
                t.new_tls.rate,
                us.new_tunnels.rate,
                "new CONNECT tunnels",
                0,
            ),
            row(
                "CPU-s per 10k transparent new TLS connections ↓",
                per_10k(t.new_tls_cpu_s, t.new_tls),
                us.cpu_per_10k_tunnels,
                "new CONNECT tunnels",
                2,
            ),
            ("RSS idle / peak, MiB, transparent ↓", _pair(t.rss_idle_mib, t.rss_peak_mib), "", ""),
        ]
    r = report.rules
    if r is not None:
        big = f"{r.rules:,}-rule allowlist"
        out += [
            row(f"HTTP keep-alive req/s, c={c}, {big} ↑", r.large.rate, r.small.rate, "1 rule", 0),
            row(
                f"CPU-s per 10k HTTP requests, {big} ↓",
                per_10k(r.large_cpu_s, r.large),
                per_10k(r.small_cpu_s, r.small),
                "1 rule",
                2,
            ),
            (
                f"RSS idle / peak, MiB, {big} ↓",
                _pair(r.large_rss_idle_mib, r.large_rss_peak_mib),
                f"{_pair(r.small_rss_idle_mib, r.small_rss_peak_mib)} (1 rule)",
                "",
            ),
        ]
        if r.edits:
            out.append(
                (
                    f"RSS after {r.edits} edits / peak, MiB, {big} ↓",
                    _pair(r.large_rss_edited_mib, r.large_rss_edit_peak_mib),
                    f"{_pair(r.large_rss_idle_mib, r.large_rss_peak_mib)} (before)",
                    "",
                )
            )
    n = report.dns
    if n is not None:
        out += dns_rows(n, c, row)
    return out


def dns_rows(
    n: DnsRun, c: int, row: Callable[[str, float, float, str, int], SidecarRow]
) -> list[SidecarRow]:
    """The DNS listener against the same server asked directly (UDP, one query in flight per
    client)."""
    return [
        row(f"DNS queries/s, c={c}, allowed name ↑", n.allowed.rate, n.direct.rate, "direct", 0),
        row(
            f"DNS queries/s, c={c}, unlisted name (NXDOMAIN by the sidecar) ↑",
            n.denied.rate,
            n.direct.rate,
            "direct",
            0,
        ),
        row(
            "CPU-s per 10k DNS queries, allowed / unlisted ↓",
            per_10k(n.allowed_cpu_s, n.allowed),
            per_10k(n.denied_cpu_s, n.denied),
            "unlisted",
            2,
        ),
        row(
            "DNS added p50 latency per query, c=1, ms ↓",
            n.latency.p50_ms - n.direct_latency.p50_ms,
            n.direct_latency.p50_ms,
            "direct p50",
            3,
        ),
        row(
            "DNS added p99 latency per query, c=1, ms ↓",
            n.latency.p99_ms - n.direct_latency.p99_ms,
            n.direct_latency.p99_ms,
            "direct p99",
            3,
        ),
        ("RSS idle / peak, MiB, DNS ↓", _pair(n.rss_idle_mib, n.rss_peak_mib), "", ""),
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
    if report.alternating is not None:
        lines.append(
            "| load generators' core busy, loaded in turn: HTTP / new tunnels / long-lived / "
            f"{s.big_bytes / 1e6:g} MB | - | {_busy(report.alternating.squid_load_core)} | "
            f"{_busy(report.alternating.load_core)} | |"
        )
        lines.append(
            "| the proxy's own CPU, share of its core, loaded in turn: HTTP / new tunnels / "
            f"long-lived / {s.big_bytes / 1e6:g} MB | - | "
            f"{_busy(report.alternating.proxy_core(squid=True))} | "
            f"{_busy(report.alternating.proxy_core(squid=False))} | |"
        )
    lines += [
        "",
        "↑ higher is better, ↓ lower is better. The direct column of the latency rows is the "
        "absolute latency without a proxy (the proxies' rows are what they add to it). "
        "The last row is noise from other processes on the proxy's core (scheduler "
        "statistics): rates and latencies suffer from it, CPU-seconds per request do not. "
        "Idle tunnels: CONNECT and a TLS handshake each, then held; per tunnel is the RSS "
        "growth over the RSS just before the first was opened. The whole bench's peak is the "
        "highest RSS of any of the proxy's processes in any scenario of this run.",
    ]
    if report.alternating is not None:
        lines[-1] += (
            f' Rows marked "{ALTERNATING}": Squid and the sidecar ran side by side on the '
            "proxy's core, loaded in the order Squid, sidecar, sidecar, Squid (each segment "
            "as long as a scenario; the big download a few times in each), so that the machine's "
            "drift weighs on both alike: the firmer ratios. The two busy lines say what bound "
            "each rate: the load generators' core (/proc/stat) near 100 % and the proxy's own "
            "share under it, the load generators and the upstream on their one core, not the "
            "proxy (its own cost is then its CPU row); the proxy's share near 100 %, the proxy. "
            "The proxy's share is its CPU-seconds over the load's own seconds (a download's "
            "start-up and a load generator's are outside them, so it can read a little over "
            "100 %)."
        )
    lines[-1] += (
        " Long-lived tunnels and the big download carry plain HTTP (tunload, bench/tunload.c; "
        "curl --proxytunnel; nginx's sendfile), so that the proxy bounds them; the proxy "
        "relays the bytes untouched either way. The TLS-inside rows (hey, curl decrypting) "
        "are bound by the load generators' core, which TLS on both ends fills first."
    )
    extra = sidecar_rows(report)
    if extra:
        lines += [
            "",
            f"| sidecar scenario | {us.name} | compared with | ratio |",
            "|---|---:|---:|---:|",
            *(f"| {label} | {ours} | {ref} | {ratio} |" for label, ours, ref, ratio in extra),
        ]
    if report.notes:
        lines += ["", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def _busy(b: LoadCoreBusy) -> str:
    shares = (b.http, b.tunnels, b.long, b.download)
    if all(math.isnan(x) for x in shares):
        return "n/a (not pinned)"
    return " / ".join(_num(x * 100) for x in shares) + " %"


def _plain(value: Any) -> Any:
    """JSON-ready: NaN as null (JSON has no NaN), containers walked."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(report: Report) -> dict[str, Any]:
    """The run as data: both tables' rows as printed, and every measured figure."""
    table = [
        {
            "scenario": label,
            "better": {"↑": "higher", "↓": "lower"}[better],
            "direct": direct,
            "squid": theirs,
            "sidecar": ours,
            "sidecar_over_squid": ours / theirs if theirs > 0 else None,
        }
        for label, direct, theirs, ours, _, better in rows(report)
    ]
    extra = [
        {"scenario": label, "sidecar": ours, "compared_with": ref, "ratio": ratio}
        for label, ours, ref, ratio in sidecar_rows(report)
    ]
    data: dict[str, Any] = _plain(
        {
            "table": table,
            "sidecar_scenarios": extra,
            "sidecar_peak_rss_mib": report.sidecar_peak_mib(),
            "proxy_core_busy": None
            if report.alternating is None
            else {
                "squid": dataclasses.asdict(report.alternating.proxy_core(squid=True)),
                "sidecar": dataclasses.asdict(report.alternating.proxy_core(squid=False)),
            },
            "run": dataclasses.asdict(report),
        }
    )
    return data
