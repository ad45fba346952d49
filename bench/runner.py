"""One benchmark run: upstream, direct baseline, Squid, the sidecar, then the sidecar-only
scenarios (span export, allowlist size, transparent capture, DNS); each scenario bounded."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.configs import (
    BIG_PATH,
    LOOPBACK,
    UpstreamPorts,
    big_allowlist_yaml,
    named_allowlist_yaml,
)
from bench.dns import DnsUnavailableError, measure_dns
from bench.idle import hold_idle_tunnels, raise_nofile
from bench.loadgen import Download, Generators, LoadResult, build_tunload, checked
from bench.otlp import SpanCounter
from bench.procstat import CoreBusy, PeakRss, cpu_seconds, rss_mib, runqueue_wait_seconds
from bench.report import (
    Alternating,
    Direct,
    DnsRun,
    ExportRun,
    LoadCoreBusy,
    ProxyRun,
    Report,
    RulesRun,
    Settings,
    TransparentRun,
)
from bench.servers import Server, Sidecar, start_nginx, start_sidecar, start_squid
from bench.tools import Tools
from bench.transparent import CpuPlan, TransparentUnavailableError, measure_transparent
from sidecar.policy.parse import digest

Log = Callable[[str], None]


@dataclass(frozen=True)
class Pinning:
    proxy: tuple[str, ...]
    load: tuple[str, ...]
    description: str
    load_cpu: int | None
    proxy_cpu: int | None = None


def plan_pinning(tools: Tools, enabled: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or tools.taskset is None or len(cpus) < 2:
        why = "disabled" if not enabled else "no taskset" if tools.taskset is None else "1 CPU"
        return Pinning((), (), f"none ({why})", None)
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    return Pinning(
        (tools.taskset, "-c", str(proxy_cpu)),
        (tools.taskset, "-c", str(load_cpu)),
        f"proxy on CPU {proxy_cpu}; load generators, upstream and the bench's own clients "
        f"and OTLP receiver on CPU {load_cpu}",
        load_cpu,
        proxy_cpu,
    )


def machine_description() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()} ({interpreter_build()})"
    )


def interpreter_build() -> str:
    """How this interpreter was built: it moves the sidecar's CPU figures by ~1.3x.

    pyenv's default build (libpython as a shared library, no PGO/LTO) runs the same bytecode
    ~1.3x slower than a distribution's (Debian's python3.13 in the image: static, PGO+LTO);
    `make bench-image` measures the image's own. Debian's build flags do not show PGO, so only
    what this interpreter can tell is said.
    """
    maps = ""
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text()
    linkage = "libpython shared" if "libpython" in maps else "libpython static"
    args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    flags = [f for f in ("--enable-optimizations", "--with-lto") if f in args]
    return linkage + (", " + " ".join(flags) if flags else ", configured without PGO/LTO flags")


def squid_name(squid: str) -> str:
    try:
        first = subprocess.run(
            [squid, "-v"], check=False, capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
        return "Squid " + first.rsplit("Version", 1)[1].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "Squid"


def sidecar_name(root: Path | None = None) -> str:
    """The sidecar's column: version and engine, and with ``root`` the image's interpreter."""
    # EGRESS_ENGINE (inherited by the sidecar: `run --engine`'s default) names the engine.
    engine = os.environ.get("EGRESS_ENGINE", "fast")
    # EGRESS_EVENT_LOOP likewise (`run --event-loop`'s default)
    loop = os.environ.get("EGRESS_EVENT_LOOP", "uvloop")
    if root is not None:
        return f"egress-sidecar image ({image_python(root)}; {engine} engine, {loop} loop)"
    try:
        ours = importlib.metadata.version("egress-sidecar")
        mitm = importlib.metadata.version("mitmproxy")
        if loop == "uvloop":
            loop = f"uvloop {importlib.metadata.version('uvloop')}"
        if engine == "mitmproxy":
            return f"egress-sidecar {ours} (engine mitmproxy {mitm}; {loop} loop)"
        return f"egress-sidecar {ours} (fast path, {loop} loop; mitmproxy {mitm} as second tier)"
    except importlib.metadata.PackageNotFoundError:
        return "egress-sidecar"


def image_python(root: Path) -> str:
    """The image's interpreter, as `python3 --version` inside it says (chroot)."""
    try:
        out = subprocess.run(
            ["chroot", str(root), "/opt/venv/bin/python", "--version"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{root} is not an egress-sidecar image's filesystem: {err}") from err
    return out.stdout.strip()


@dataclass(frozen=True)
class _Scenarios:
    http: LoadResult
    http_cpu_s: float
    latency: LoadResult
    new_tls: LoadResult
    new_tls_cpu_s: float
    long: LoadResult
    keepalive_tls: LoadResult
    download: Download
    download_cpu_s: float
    download_tls: Download


def _run_scenarios(
    gen: Generators,
    up: UpstreamPorts,
    s: Settings,
    *,
    label: str,
    proxy_port: int | None,
    cpu: Callable[[], float],
    log: Log,
) -> _Scenarios:
    """The same loads, direct (``proxy_port`` None) or through a proxy; ``cpu`` is its clock."""
    c = s.connections
    log(f"{label}: plain HTTP keep-alive")
    cpu0 = cpu()
    http = gen.wrk_http(
        upstream_port=up.http,
        proxy_port=proxy_port,
        connections=c,
        seconds=s.seconds,
        limit=s.max_requests,
    )
    http_cpu = cpu() - cpu0
    log(f"{label}: latency at c=1")
    latency = gen.wrk_http(
        upstream_port=up.http,
        proxy_port=proxy_port,
        connections=1,
        seconds=s.latency_seconds,
        limit=s.max_requests,
    )
    log(f"{label}: new TLS connections (through a proxy: new CONNECT tunnels)")
    cpu0 = cpu()
    new_tls = gen.hey_https(
        upstream_port=up.https,
        proxy_port=proxy_port,
        connections=c,
        seconds=s.seconds,
        new_connection_each=True,
        max_qps_per_worker=s.max_qps_per_worker,
    )
    new_tls_cpu = cpu() - cpu0
    log(f"{label}: HTTP keep-alive inside long-lived tunnels (tunload)")
    long = gen.tunnel_http(
        upstream_port=up.http,
        proxy_port=proxy_port,
        connections=c,
        seconds=s.seconds,
        limit=s.max_requests,
    )
    log(f"{label}: HTTPS keep-alive (through a proxy: long-lived TLS tunnels, hey)")
    keepalive_tls = gen.hey_https(
        upstream_port=up.https,
        proxy_port=proxy_port,
        connections=c,
        seconds=s.seconds,
        new_connection_each=False,
        max_qps_per_worker=s.max_qps_per_worker,
    )
    log(f"{label}: one big download (through a proxy: in a tunnel)")
    cpu0 = cpu()
    download = gen.curl_download(
        url=f"http://{LOOPBACK}:{up.http}{BIG_PATH}",
        proxy_port=proxy_port,
        max_seconds=60,
        tunnel=True,
    )
    download_cpu = cpu() - cpu0
    log(f"{label}: one big download over TLS")
    download_tls = gen.curl_download(
        url=f"https://{LOOPBACK}:{up.https}{BIG_PATH}", proxy_port=proxy_port, max_seconds=60
    )
    return _Scenarios(
        http,
        http_cpu,
        latency,
        new_tls,
        new_tls_cpu,
        long,
        keepalive_tls,
        download,
        download_cpu,
        download_tls,
    )


def measure_direct(gen: Generators, up: UpstreamPorts, s: Settings, log: Log) -> Direct:
    sc = _run_scenarios(gen, up, s, label="direct", proxy_port=None, cpu=lambda: 0.0, log=log)
    return Direct(
        sc.http, sc.latency, sc.new_tls, sc.long, sc.keepalive_tls, sc.download, sc.download_tls
    )


def measure_proxy(
    *,
    name: str,
    server: Server,
    port: int,
    gen: Generators,
    up: UpstreamPorts,
    s: Settings,
    notes: list[str],
    log: Log,
) -> ProxyRun:
    pid = server.pid
    time.sleep(s.idle_seconds)  # let start-up work (imports, CA generation) settle
    rss_idle = rss_mib(pid)
    wait0, wall0 = runqueue_wait_seconds(pid), time.monotonic()
    with PeakRss(pid) as whole:
        with PeakRss(pid) as peak:
            if s.warmup_seconds > 0:
                gen.wrk_http(
                    upstream_port=up.http,
                    proxy_port=port,
                    connections=s.connections,
                    seconds=s.warmup_seconds,
                    limit=s.max_requests,
                )
            sc = _run_scenarios(
                gen, up, s, label=name, proxy_port=port, cpu=lambda: cpu_seconds(pid), log=log
            )
        load_seconds = time.monotonic() - wall0
        cpu_wait = runqueue_wait_seconds(pid) - wait0
        idle = None
        if s.idle_connections > 0:
            log(f"{name}: {s.idle_connections:,} idle tunnels")
            idle = hold_idle_tunnels(port, up.https, s.idle_connections, lambda: rss_mib(pid))
            if idle.held < idle.wanted:
                notes.append(
                    f"{name}: {idle.held:,} of {idle.wanted:,} idle tunnels held "
                    f"({idle.failed:,} failed to open)"
                )
    for what, download in (("big download", sc.download), ("big TLS download", sc.download_tls)):
        if download.status != 200 or download.size != s.big_bytes:
            notes.append(f"{name}: {what} got {download.status}, {download.size} bytes")
    return ProxyRun(
        name=name,
        http=checked(f"{name} HTTP keep-alive", sc.http, notes),
        http_cpu_s=sc.http_cpu_s,
        latency=checked(f"{name} latency c=1", sc.latency, notes),
        new_tunnels=checked(f"{name} new tunnels", sc.new_tls, notes),
        new_tunnels_cpu_s=sc.new_tls_cpu_s,
        long_tunnels=checked(f"{name} long-lived tunnels", sc.long, notes),
        long_tls_tunnels=checked(f"{name} long-lived TLS tunnels", sc.keepalive_tls, notes),
        download=sc.download,
        download_cpu_s=sc.download_cpu_s,
        download_tls=sc.download_tls,
        load_seconds=load_seconds,
        cpu_wait_s=cpu_wait,
        rss_idle_mib=rss_idle,
        rss_peak_mib=peak.peak,
        idle=idle,
        rss_peak_all_mib=whole.peak,
    )


@dataclass(frozen=True)
class Context:
    """What the sidecar-only scenarios share: load, upstream, settings, pinning, notes, log."""

    gen: Generators
    up: UpstreamPorts
    s: Settings
    pinning: Pinning
    notes: list[str]
    log: Log


@dataclass
class Arm:
    """One proxy of a paired comparison and what it measured."""

    label: str
    pid: int
    port: int
    name: str | None = None  # the host name requested (None: the upstream's address)
    after: Callable[[LoadResult], None] | None = None  # runs inside the CPU window
    runs: list[LoadResult] = field(default_factory=list)
    cpu_s: float = 0.0
    rss_idle_mib: float = 0.0
    rss_peak_mib: float = 0.0
    # the load generators' core over this arm's segments (read only where it is pinned)
    load_core: CoreBusy = field(default_factory=lambda: CoreBusy(None))

    def result(self) -> LoadResult:
        """The segments as one run: counts and time summed, the worse percentiles."""
        return LoadResult(
            ok=sum(r.ok for r in self.runs),
            errors=sum(r.errors for r in self.runs),
            seconds=sum(r.seconds for r in self.runs),
            p50_ms=max(r.p50_ms for r in self.runs),
            p99_ms=max(r.p99_ms for r in self.runs),
        )


Load = Callable[[Arm, int], LoadResult]  # one segment of load through an arm, its seconds


def _http_load(ctx: Context) -> Load:
    def load(arm: Arm, seconds: int) -> LoadResult:
        return ctx.gen.wrk_http(
            upstream_port=ctx.up.http,
            proxy_port=arm.port,
            connections=ctx.s.connections,
            seconds=seconds,
            limit=ctx.s.max_requests,
            name=arm.name,
        )

    return load


def _new_tunnels_load(ctx: Context) -> Load:
    """HTTPS through a new CONNECT tunnel per request (hey)."""

    def load(arm: Arm, seconds: int) -> LoadResult:
        return ctx.gen.hey_https(
            upstream_port=ctx.up.https,
            proxy_port=arm.port,
            connections=ctx.s.connections,
            seconds=seconds,
            new_connection_each=True,
            max_qps_per_worker=ctx.s.max_qps_per_worker,
        )

    return load


def _long_tunnels_load(ctx: Context) -> Load:
    """Plain HTTP keep-alive inside long-lived CONNECT tunnels (tunload: light enough that the
    proxy, not the load generators' core, bounds the rate)."""

    def load(arm: Arm, seconds: int) -> LoadResult:
        return ctx.gen.tunnel_http(
            upstream_port=ctx.up.http,
            proxy_port=arm.port,
            connections=ctx.s.connections,
            seconds=seconds,
            limit=ctx.s.max_requests,
        )

    return load


# Big downloads per segment of the rounds loaded in turn. One lasts a tenth of a second or less,
# so the ratio is read over twelve per proxy. (With TLS inside, when the load generators' core
# bound them, single downloads through one proxy ranged 200-670 MB/s within a minute and six
# per proxy read 0.86-1.27x across runs of unchanged code; over plain HTTP the twelve through
# each proxy read 841-1,194 MB/s for Squid and 1,382-2,198 for the sidecar in two runs.)
DOWNLOADS_PER_SEGMENT = 6


def _paired_downloads(ctx: Context, a: Arm, b: Arm) -> dict[str, list[Download]]:
    """The big download through each proxy in the order A B B A, a few each time; each arm's
    CPU through them is added to its ``cpu_s``."""
    got: dict[str, list[Download]] = {a.label: [], b.label: []}
    url = f"http://{LOOPBACK}:{ctx.up.http}{BIG_PATH}"  # in a tunnel: see _run_scenarios
    for arm in (a, b, b, a):
        cpu0 = cpu_seconds(arm.pid)
        with arm.load_core:  # one window per segment, as the CPU's and _paired's
            downloads = [
                ctx.gen.curl_download(url=url, proxy_port=arm.port, max_seconds=60, tunnel=True)
                for _ in range(DOWNLOADS_PER_SEGMENT)
            ]
        arm.cpu_s += cpu_seconds(arm.pid) - cpu0
        for download in downloads:
            if download.status != 200 or download.size != ctx.s.big_bytes:
                ctx.notes.append(
                    f"{arm.label}, loaded in turn: big download got {download.status}, "
                    f"{download.size} bytes"
                )
        got[arm.label] += downloads
    return got


def _paired(
    ctx: Context,
    a: Arm,
    b: Arm,
    warmed: Callable[[], None] | None = None,
    *,
    load: Load | None = None,
    warm: bool = True,
    segment: int | None = None,
) -> None:
    """A scenario (``load``: plain HTTP by default) on two proxies in the order A B B A, each
    segment ``segment`` seconds (by default half the scenario's length): whatever else loads
    the machine meanwhile weighs on both alike. ``warm``: a warm-up of plain HTTP through each
    first."""
    s = ctx.s
    run_load = load or _http_load(ctx)
    time.sleep(s.idle_seconds)
    for arm in (a, b):
        arm.rss_idle_mib = rss_mib(arm.pid)
    segment = segment or max(round(s.seconds / 2), 1)
    with PeakRss(a.pid) as peak_a, PeakRss(b.pid) as peak_b:
        if warm and s.warmup_seconds > 0:
            for arm in (a, b):
                _http_load(ctx)(arm, s.warmup_seconds)
        if warmed is not None:
            warmed()
        for arm in (a, b, b, a):
            cpu0 = cpu_seconds(arm.pid)
            with arm.load_core:
                run = run_load(arm, segment)
            if arm.after is not None:
                arm.after(run)
            arm.cpu_s += cpu_seconds(arm.pid) - cpu0
            arm.runs.append(run)
    a.rss_peak_mib, b.rss_peak_mib = peak_a.peak, peak_b.peak


def measure_alternating(
    ctx: Context, squid: tuple[int, int], sidecar: Sidecar, squid_label: str
) -> Alternating:
    """The CPU and one-tunnel targets again, Squid (``squid``: its pid and port) and the
    sidecar both up and warm, loaded in turn: plain HTTP, new tunnels, long-lived tunnels, then
    the big download."""
    ctx.log(
        f"{squid_label} and the sidecar loaded in turn: plain HTTP, new tunnels, long-lived "
        "tunnels, the big download"
    )
    arms: dict[str, tuple[Arm, Arm]] = {}
    loads = (
        ("http", _http_load(ctx)),
        ("tunnels", _new_tunnels_load(ctx)),
        ("long", _long_tunnels_load(ctx)),
    )
    load_cpu = ctx.pinning.load_cpu
    for kind, load in loads:
        theirs = Arm(squid_label, *squid, load_core=CoreBusy(load_cpu))
        ours = Arm("sidecar", sidecar.server.pid, sidecar.port, load_core=CoreBusy(load_cpu))
        # whole-scenario segments: the ratio the targets are read from
        _paired(ctx, theirs, ours, load=load, warm=False, segment=ctx.s.seconds)
        arms[kind] = (theirs, ours)
    (sq_http, http), (sq_tunnels, tunnels) = arms["http"], arms["tunnels"]
    sq_long, long = arms["long"]
    sq_big = Arm(squid_label, *squid, load_core=CoreBusy(load_cpu))
    big = Arm("sidecar", sidecar.server.pid, sidecar.port, load_core=CoreBusy(load_cpu))
    with PeakRss(big.pid) as big_peak:
        downloads = _paired_downloads(ctx, sq_big, big)
    return Alternating(
        squid_http=checked(f"{squid_label} HTTP, loaded in turn", sq_http.result(), ctx.notes),
        squid_http_cpu_s=sq_http.cpu_s,
        http=checked("sidecar HTTP, loaded in turn", http.result(), ctx.notes),
        http_cpu_s=http.cpu_s,
        squid_tunnels=checked(
            f"{squid_label} new tunnels, loaded in turn", sq_tunnels.result(), ctx.notes
        ),
        squid_tunnels_cpu_s=sq_tunnels.cpu_s,
        tunnels=checked("sidecar new tunnels, loaded in turn", tunnels.result(), ctx.notes),
        tunnels_cpu_s=tunnels.cpu_s,
        squid_long=checked(
            f"{squid_label} long-lived tunnels, loaded in turn", sq_long.result(), ctx.notes
        ),
        squid_long_cpu_s=sq_long.cpu_s,
        long=checked("sidecar long-lived tunnels, loaded in turn", long.result(), ctx.notes),
        long_cpu_s=long.cpu_s,
        squid_downloads=tuple(downloads[squid_label]),
        squid_downloads_cpu_s=sq_big.cpu_s,
        downloads=tuple(downloads["sidecar"]),
        downloads_cpu_s=big.cpu_s,
        rss_peak_mib=max(http.rss_peak_mib, tunnels.rss_peak_mib, long.rss_peak_mib, big_peak.peak),
        squid_load_core=LoadCoreBusy(
            sq_http.load_core.share,
            sq_tunnels.load_core.share,
            sq_long.load_core.share,
            sq_big.load_core.share,
        ),
        load_core=LoadCoreBusy(
            http.load_core.share,
            tunnels.load_core.share,
            long.load_core.share,
            big.load_core.share,
        ),
    )


def measure_export(ctx: Context, workdir: Path) -> ExportRun:
    """Plain HTTP on a sidecar exporting spans to the bench's OTLP receiver, paired with one
    that exports nothing (the first table's configuration)."""
    ctx.log("span export on and off: plain HTTP keep-alive, A B B A")
    receiver = SpanCounter()
    counted = {"base": 0, "expected": 0}
    flush: list[float] = []

    def warmed() -> None:
        # the warm-up's spans are in before the first measured segment (or never will be)
        counted["base"] = counted["expected"] = receiver.wait_for(1 << 62, timeout=15, quiet=1.5)

    def drained(run: LoadResult) -> None:
        # the export's own work after the load belongs to the run: wait for its spans
        ended = time.monotonic()
        counted["expected"] += run.ok + run.errors
        receiver.wait_for(counted["expected"], timeout=20)
        flush.append(time.monotonic() - ended)

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        # batches leave at 512 spans under load anyway; this only shortens the wait for the
        # last partial batch after it (the sidecar's default is 1 s)
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }
    try:
        off = start_sidecar(ctx.pinning.proxy, workdir / "off", ctx.up, root=ctx.s.sidecar_root)
        try:
            on = start_sidecar(
                ctx.pinning.proxy, workdir / "on", ctx.up, env=env, root=ctx.s.sidecar_root
            )
            try:
                a = Arm("export off", off.server.pid, off.port)
                b = Arm("export on", on.server.pid, on.port, after=drained)
                _paired(ctx, a, b, warmed)
            finally:
                on.server.stop()
        finally:
            off.server.stop()
    finally:
        receiver.stop()
    if receiver.refused:
        ctx.notes.append(f"OTLP receiver: {receiver.refused} request(s) it could not decode")
    spans = receiver.spans - counted["base"]
    requests = counted["expected"] - counted["base"]
    if spans < requests:
        ctx.notes.append(f"span export on: {spans:,} spans received for {requests:,} requests")
    return ExportRun(
        http=checked("span export on HTTP keep-alive", b.result(), ctx.notes),
        cpu_s=b.cpu_s,
        off=checked("span export off HTTP keep-alive", a.result(), ctx.notes),
        off_cpu_s=a.cpu_s,
        spans=spans,
        requests=requests,
        flush_s=max(flush),
        rss_idle_mib=b.rss_idle_mib,
        rss_peak_mib=b.rss_peak_mib,
        off_rss_idle_mib=a.rss_idle_mib,
        off_rss_peak_mib=a.rss_peak_mib,
    )


RULES_HOST = "api-0042.payments.rules.bench.test"


def measure_rules(ctx: Context, workdir: Path) -> RulesRun:
    """Plain HTTP to a named host allowed by a one-rule allowlist and by one rule of many."""
    n, up = ctx.s.rules, ctx.up
    ctx.log(f"allowlist of 1 rule and of {n:,} rules: plain HTTP to a named host, A B B A")
    names = {RULES_HOST: LOOPBACK}
    small = start_sidecar(
        ctx.pinning.proxy,
        workdir / "small",
        up,
        allowlist=named_allowlist_yaml(RULES_HOST, up.http),
        names=names,
        root=ctx.s.sidecar_root,  # both arms the same sidecar: the image's, in bench-image
    )
    try:
        large = start_sidecar(
            ctx.pinning.proxy,
            workdir / "large",
            up,
            allowlist=big_allowlist_yaml(n, RULES_HOST, up.http),
            names=names,
            root=ctx.s.sidecar_root,
        )
        try:
            a = Arm("1 rule", small.server.pid, small.port, RULES_HOST)
            b = Arm(f"{n} rules", large.server.pid, large.port, RULES_HOST)
            _paired(ctx, a, b)
            edited = (
                _edit_allowlist(ctx, large, workdir / "large" / "allowlist.yaml")
                if ctx.s.allowlist_edits
                else _Edited(0, 0.0, 0.0)
            )
        finally:
            large.server.stop()
    finally:
        small.server.stop()
    return RulesRun(
        rules=n,
        small=checked("1-rule allowlist HTTP keep-alive", a.result(), ctx.notes),
        small_cpu_s=a.cpu_s,
        large=checked(f"{n:,}-rule allowlist HTTP keep-alive", b.result(), ctx.notes),
        large_cpu_s=b.cpu_s,
        small_rss_idle_mib=a.rss_idle_mib,
        small_rss_peak_mib=a.rss_peak_mib,
        large_rss_idle_mib=b.rss_idle_mib,
        large_rss_peak_mib=b.rss_peak_mib,
        edits=edited.edits,
        large_rss_edited_mib=edited.rss_after_mib,
        large_rss_edit_peak_mib=edited.rss_peak_mib,
    )


@dataclass(frozen=True)
class _Edited:
    edits: int
    rss_after_mib: float
    rss_peak_mib: float


def _policy_version(health_port: int) -> str | None:
    """The allowlist version the sidecar enforces, from its egress_policy_info metric."""
    url = f"http://{LOOPBACK}:{health_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found = re.search(r'^egress_policy_info\{[^}]*version="([^"]+)"[^}]*\} 1', text, re.M)
    return found.group(1) if found else None


def _edit_allowlist(ctx: Context, sidecar: Sidecar, path: Path) -> _Edited:
    """An operator's edits: the large allowlist rewritten ``edits`` times, one host renamed
    each time, every version waited for until the sidecar enforces it; its RSS after the
    last and at its highest. A reload that left its parse behind would climb here."""
    edits = ctx.s.allowlist_edits
    ctx.log(f"{ctx.s.rules:,}-rule allowlist: {edits} edits, each reloaded")
    original = path.read_text()
    first_host = re.search(r"host: (\S+)", original)
    if first_host is None:
        raise RuntimeError(f"{path}: no host rule to rename")
    with PeakRss(sidecar.server.pid) as peak:
        for edit in range(1, edits + 1):
            text = original.replace(first_host.group(1), f"edit-{edit}.{first_host.group(1)}", 1)
            staged = path.with_suffix(".next")
            staged.write_text(text)
            staged.replace(path)  # atomically, as the kubelet swaps a ConfigMap volume
            version, deadline = digest(text), time.monotonic() + 60
            while _policy_version(sidecar.health_port) != version:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sidecar did not load edit {edit} within 60 s")
                time.sleep(0.1)
        after = rss_mib(sidecar.server.pid)
    return _Edited(edits, after, peak.peak)


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _own_cpu(cpu: int | None) -> Iterator[None]:
    """Our own sampling thread stays off the proxy's core too (restored after: a caller such
    as pytest keeps its CPUs)."""
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run(
    tools: Tools,
    settings: Settings,
    *,
    pin: bool = True,
    keep_workdir: bool = False,
    log: Log = print,
) -> Report:
    pinning = plan_pinning(tools, pin)
    # the bench holds one socket per idle tunnel, nginx one, Squid two; children inherit it
    raise_nofile(2 * settings.idle_connections + 1024)
    with _workdir(keep_workdir) as work, _own_cpu(pinning.load_cpu):
        if keep_workdir:
            log(f"work directory: {work}")
        notes: list[str] = []
        gen = Generators(
            tools.wrk, tools.hey, tools.curl, pinning.load, work, build_tunload(tools.cc, work)
        )
        nginx, up = start_nginx(tools.nginx, pinning.load, work / "nginx", settings.big_bytes)
        try:
            direct = measure_direct(gen, up, settings, log)
            ctx = Context(gen, up, settings, pinning, notes, log)
            # Squid stays up (idle) while the sidecar is measured: both are then loaded in turn
            squid_label = squid_name(tools.squid)
            squid, squid_port = start_squid(tools.squid, pinning.proxy, work / "squid", up)
            try:
                baseline = measure_proxy(
                    name=squid_label,
                    server=squid,
                    port=squid_port,
                    gen=gen,
                    up=up,
                    s=settings,
                    notes=notes,
                    log=log,
                )
                sidecar = start_sidecar(
                    pinning.proxy, work / "sidecar", up, root=settings.sidecar_root
                )
                try:
                    ours = measure_proxy(
                        name=sidecar_name(settings.sidecar_root),
                        server=sidecar.server,
                        port=sidecar.port,
                        gen=gen,
                        up=up,
                        s=settings,
                        notes=notes,
                        log=log,
                    )
                    alternating = measure_alternating(
                        ctx, (squid.pid, squid_port), sidecar, squid_label
                    )
                finally:
                    sidecar.server.stop()
            finally:
                squid.stop()
            export = measure_export(ctx, work / "export")
            rules = measure_rules(ctx, work / "rules") if settings.rules > 0 else None
        finally:
            nginx.stop()
        dns: DnsRun | None = None
        if settings.dns:
            try:
                dns = measure_dns(
                    settings,
                    proxy_prefix=pinning.proxy,
                    load_prefix=pinning.load,
                    workdir=work / "dns",
                    log=log,
                    notes=notes,
                )
            except DnsUnavailableError as err:
                notes.append(f"DNS not measured: {err}")
        transparent: TransparentRun | None = None
        if settings.sidecar_root is not None:
            notes.append(
                "transparent capture and DNS not measured with --sidecar-root (their harnesses "
                "start this venv's sidecar): see `make bench`"
            )
        elif settings.transparent:
            try:
                transparent = measure_transparent(
                    tools, settings, CpuPlan(pinning.proxy_cpu, pinning.load), log, notes
                )
            except TransparentUnavailableError as err:
                notes.append(f"transparent capture not measured: {err}")
    return Report(
        when=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_description(),
        upstream="nginx (one process; `return 200` body over HTTP and TLS, a file for the "
        "big download over both, plain HTTP's with sendfile)",
        load="wrk (one thread, Lua script sending absolute-form requests) for plain HTTP; "
        "hey -x for HTTPS through new CONNECT tunnels and long-lived TLS tunnels; tunload "
        "(bench/tunload.c) for plain HTTP in long-lived tunnels; curl for the big download "
        "(--proxytunnel)",
        pinning=pinning.description,
        settings=settings,
        direct=direct,
        baseline=baseline,
        sidecar=ours,
        export=export,
        transparent=transparent,
        rules=rules,
        dns=dns,
        notes=notes,
        alternating=alternating,
    )
