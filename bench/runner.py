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

from bench.configs import BIG_PATH, LOOPBACK, UpstreamPorts
from bench.loadgen import Download, Generators, LoadResult
from bench.procstat import PeakRss, cpu_seconds, rss_mib, runqueue_wait_seconds
from bench.report import Direct, ProxyRun, Report, Settings
from bench.servers import Server, start_nginx, start_sidecar, start_squid
from bench.tools import Tools

Log = Callable[[str], None]


@dataclass(frozen=True)
class Pinning:
    proxy: tuple[str, ...]
    load: tuple[str, ...]
    description: str
    load_cpu: int | None


def plan_pinning(tools: Tools, enabled: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or tools.taskset is None or len(cpus) < 2:
        why = "disabled" if not enabled else "no taskset" if tools.taskset is None else "1 CPU"
        return Pinning((), (), f"none ({why})", None)
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    return Pinning(
        (tools.taskset, "-c", str(proxy_cpu)),
        (tools.taskset, "-c", str(load_cpu)),
        f"proxy on CPU {proxy_cpu}; load generators and upstream on CPU {load_cpu}",
        load_cpu,
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


def _checked(what: str, result: LoadResult, notes: list[str]) -> LoadResult:
    total = result.ok + result.errors
    if result.ok == 0:
        raise RuntimeError(f"{what}: no successful response ({result.errors} errors)")
    if result.errors and result.errors / total > 0.001:
        notes.append(f"{what}: {result.errors} of {total} requests failed")
    return result


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
    if sc.download.status != 200 or sc.download.size != s.big_bytes:
        notes.append(f"{name}: big download got {sc.download.status}, {sc.download.size} bytes")
    return ProxyRun(
        name=name,
        http=_checked(f"{name} HTTP keep-alive", sc.http, notes),
        http_cpu_s=sc.http_cpu_s,
        latency=_checked(f"{name} latency c=1", sc.latency, notes),
        new_tunnels=_checked(f"{name} new tunnels", sc.new_tls, notes),
        new_tunnels_cpu_s=sc.new_tls_cpu_s,
        long_tunnels=_checked(f"{name} long-lived tunnels", sc.keepalive_tls, notes),
        download=sc.download,
        download_cpu_s=sc.download_cpu_s,
        load_seconds=load_seconds,
        cpu_wait_s=cpu_wait,
        rss_idle_mib=rss_idle,
        rss_peak_mib=peak.peak,
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
        finally:
            nginx.stop()
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
        notes=notes,
    )
