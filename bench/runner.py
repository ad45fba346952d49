"""One benchmark run: upstream, direct baseline, Squid, the sidecar; each scenario bounded."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.configs import (
    BIG_PATH,
    LOOPBACK,
    UpstreamPorts,
    big_allowlist_yaml,
    named_allowlist_yaml,
)
from bench.idle import hold_idle_tunnels, raise_nofile
from bench.loadgen import Download, Generators, LoadResult, checked
from bench.otlp import SpanCounter
from bench.procstat import PeakRss, cpu_seconds, rss_mib, runqueue_wait_seconds
from bench.report import Direct, ExportRun, ProxyRun, Report, RulesRun, Settings, TransparentRun
from bench.servers import Server, start_nginx, start_sidecar, start_squid
from bench.tools import Tools
from bench.transparent import CpuPlan, TransparentUnavailableError, measure_transparent

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
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, Python " + (
        platform.python_version()
    )


def squid_name(squid: str) -> str:
    try:
        first = subprocess.run(
            [squid, "-v"], check=False, capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
        return "Squid " + first.rsplit("Version", 1)[1].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "Squid"


def sidecar_name() -> str:
    try:
        ours = importlib.metadata.version("egress-sidecar")
        mitm = importlib.metadata.version("mitmproxy")
        return f"egress-sidecar {ours} (mitmproxy {mitm})"
    except importlib.metadata.PackageNotFoundError:
        return "egress-sidecar"


@dataclass(frozen=True)
class _Scenarios:
    http: LoadResult
    http_cpu_s: float
    latency: LoadResult
    new_tls: LoadResult
    new_tls_cpu_s: float
    keepalive_tls: LoadResult
    download: Download
    download_cpu_s: float


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
    log(f"{label}: HTTPS keep-alive (through a proxy: long-lived tunnels)")
    keepalive_tls = gen.hey_https(
        upstream_port=up.https,
        proxy_port=proxy_port,
        connections=c,
        seconds=s.seconds,
        new_connection_each=False,
        max_qps_per_worker=s.max_qps_per_worker,
    )
    log(f"{label}: one big download")
    cpu0 = cpu()
    download = gen.curl_download(
        url=f"https://{LOOPBACK}:{up.https}{BIG_PATH}", proxy_port=proxy_port, max_seconds=60
    )
    return _Scenarios(
        http, http_cpu, latency, new_tls, new_tls_cpu, keepalive_tls, download, cpu() - cpu0
    )


def measure_direct(gen: Generators, up: UpstreamPorts, s: Settings, log: Log) -> Direct:
    sc = _run_scenarios(gen, up, s, label="direct", proxy_port=None, cpu=lambda: 0.0, log=log)
    return Direct(sc.http, sc.latency, sc.new_tls, sc.keepalive_tls, sc.download)


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
    if sc.download.status != 200 or sc.download.size != s.big_bytes:
        notes.append(f"{name}: big download got {sc.download.status}, {sc.download.size} bytes")
    return ProxyRun(
        name=name,
        http=checked(f"{name} HTTP keep-alive", sc.http, notes),
        http_cpu_s=sc.http_cpu_s,
        latency=checked(f"{name} latency c=1", sc.latency, notes),
        new_tunnels=checked(f"{name} new tunnels", sc.new_tls, notes),
        new_tunnels_cpu_s=sc.new_tls_cpu_s,
        long_tunnels=checked(f"{name} long-lived tunnels", sc.keepalive_tls, notes),
        download=sc.download,
        download_cpu_s=sc.download_cpu_s,
        load_seconds=load_seconds,
        cpu_wait_s=cpu_wait,
        rss_idle_mib=rss_idle,
        rss_peak_mib=peak.peak,
        idle=idle,
        rss_peak_all_mib=whole.peak,
    )


def _warm_up(gen: Generators, up: UpstreamPorts, s: Settings, port: int, name: str | None) -> int:
    """Unmeasured plain-HTTP load; the requests it made."""
    if s.warmup_seconds <= 0:
        return 0
    w = gen.wrk_http(
        upstream_port=up.http,
        proxy_port=port,
        connections=s.connections,
        seconds=s.warmup_seconds,
        limit=s.max_requests,
        name=name,
    )
    return w.ok + w.errors


@dataclass(frozen=True)
class Context:
    """What the sidecar-only scenarios share: load, upstream, settings, pinning, notes, log."""

    gen: Generators
    up: UpstreamPorts
    s: Settings
    pinning: Pinning
    notes: list[str]
    log: Log


def measure_export(ctx: Context, workdir: Path) -> ExportRun:
    """The plain-HTTP scenario on a sidecar exporting spans to the bench's OTLP receiver."""
    gen, up, s, notes = ctx.gen, ctx.up, ctx.s, ctx.notes
    receiver = SpanCounter()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            # batches leave at 512 spans under load anyway; this only shortens the wait for
            # the last partial batch after it (the default is 5 s)
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        }
        sidecar = start_sidecar(ctx.pinning.proxy, workdir, up, env=env)
        try:
            pid = sidecar.server.pid
            time.sleep(s.idle_seconds)
            rss_idle = rss_mib(pid)
            with PeakRss(pid) as peak:
                warm = _warm_up(gen, up, s, sidecar.port, None)
                base = receiver.wait_for(receiver.spans + warm, timeout=15)
                ctx.log("span export on: plain HTTP keep-alive")
                cpu0 = cpu_seconds(pid)
                http = gen.wrk_http(
                    upstream_port=up.http,
                    proxy_port=sidecar.port,
                    connections=s.connections,
                    seconds=s.seconds,
                    limit=s.max_requests,
                )
                ended = time.monotonic()
                requests = http.ok + http.errors
                got = receiver.wait_for(base + requests, timeout=20)
                flushed = time.monotonic() - ended
                cpu = cpu_seconds(pid) - cpu0
        finally:
            sidecar.server.stop()
    finally:
        receiver.stop()
    if receiver.refused:
        notes.append(f"OTLP receiver: {receiver.refused} export request(s) it could not decode")
    spans = got - base
    if spans < requests:
        notes.append(f"span export on: {spans:,} spans received for {requests:,} requests")
    return ExportRun(
        http=checked("span export on HTTP keep-alive", http, notes),
        cpu_s=cpu,
        spans=spans,
        requests=requests,
        flush_s=flushed,
        rss_idle_mib=rss_idle,
        rss_peak_mib=peak.peak,
    )


RULES_HOST = "api-0042.payments.rules.bench.test"


def _rules_instance(
    ctx: Context, workdir: Path, allowlist: str
) -> tuple[LoadResult, float, float, float]:
    """The plain-HTTP scenario to RULES_HOST; (result, CPU-s, RSS idle, RSS peak)."""
    gen, up, s = ctx.gen, ctx.up, ctx.s
    sidecar = start_sidecar(
        ctx.pinning.proxy, workdir, up, allowlist=allowlist, names={RULES_HOST: LOOPBACK}
    )
    try:
        pid = sidecar.server.pid
        time.sleep(s.idle_seconds)
        rss_idle = rss_mib(pid)
        with PeakRss(pid) as peak:
            _warm_up(gen, up, s, sidecar.port, RULES_HOST)
            cpu0 = cpu_seconds(pid)
            http = gen.wrk_http(
                upstream_port=up.http,
                proxy_port=sidecar.port,
                connections=s.connections,
                seconds=s.seconds,
                limit=s.max_requests,
                name=RULES_HOST,
            )
            cpu = cpu_seconds(pid) - cpu0
    finally:
        sidecar.server.stop()
    return http, cpu, rss_idle, peak.peak


def measure_rules(ctx: Context, workdir: Path) -> RulesRun:
    n = ctx.s.rules
    ctx.log(f"allowlist size: plain HTTP to a named host, 1 rule, then {n:,} rules")
    small = _rules_instance(ctx, workdir / "small", named_allowlist_yaml(RULES_HOST, ctx.up.http))
    large = _rules_instance(ctx, workdir / "large", big_allowlist_yaml(n, RULES_HOST, ctx.up.http))
    notes = ctx.notes
    return RulesRun(
        rules=n,
        small=checked("1-rule allowlist HTTP keep-alive", small[0], notes),
        small_cpu_s=small[1],
        large=checked(f"{n:,}-rule allowlist HTTP keep-alive", large[0], notes),
        large_cpu_s=large[1],
        small_rss_idle_mib=small[2],
        small_rss_peak_mib=small[3],
        large_rss_idle_mib=large[2],
        large_rss_peak_mib=large[3],
    )


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
        gen = Generators(tools.wrk, tools.hey, tools.curl, pinning.load, work)
        nginx, up = start_nginx(tools.nginx, pinning.load, work / "nginx", settings.big_bytes)
        try:
            direct = measure_direct(gen, up, settings, log)
            squid, squid_port = start_squid(tools.squid, pinning.proxy, work / "squid", up)
            try:
                baseline = measure_proxy(
                    name=squid_name(tools.squid),
                    server=squid,
                    port=squid_port,
                    gen=gen,
                    up=up,
                    s=settings,
                    notes=notes,
                    log=log,
                )
            finally:
                squid.stop()
            sidecar = start_sidecar(pinning.proxy, work / "sidecar", up)
            try:
                ours = measure_proxy(
                    name=sidecar_name(),
                    server=sidecar.server,
                    port=sidecar.port,
                    gen=gen,
                    up=up,
                    s=settings,
                    notes=notes,
                    log=log,
                )
            finally:
                sidecar.server.stop()
            ctx = Context(gen, up, settings, pinning, notes, log)
            export = measure_export(ctx, work / "export")
            rules = measure_rules(ctx, work / "rules") if settings.rules > 0 else None
        finally:
            nginx.stop()
        transparent: TransparentRun | None = None
        if settings.transparent:
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
        "big download)",
        load="wrk (one thread, Lua script sending absolute-form requests) for plain HTTP; "
        "hey -x for HTTPS through CONNECT; curl for the big download",
        pinning=pinning.description,
        settings=settings,
        direct=direct,
        baseline=baseline,
        sidecar=ours,
        export=export,
        transparent=transparent,
        rules=rules,
        notes=notes,
    )
