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
from bench.loadgen import Generators, LoadResult
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


def measure_direct(gen: Generators, up: UpstreamPorts, s: Settings, log: Log) -> Direct:
    c = s.connections
    log("direct: plain HTTP keep-alive")
    http = gen.wrk_http(
        upstream_port=up.http,
        proxy_port=None,
        connections=c,
        seconds=s.seconds,
        limit=s.max_requests,
    )
    log("direct: latency at c=1")
    latency = gen.wrk_http(
        upstream_port=up.http,
        proxy_port=None,
        connections=1,
        seconds=s.latency_seconds,
        limit=s.max_requests,
    )
    log("direct: new TLS connections")
    new_tls = gen.hey_https(
        upstream_port=up.https,
        proxy_port=None,
        connections=c,
        seconds=s.seconds,
        new_connection_each=True,
        max_qps_per_worker=s.max_qps_per_worker,
    )
    log("direct: HTTPS keep-alive")
    keepalive = gen.hey_https(
        upstream_port=up.https,
        proxy_port=None,
        connections=c,
        seconds=s.seconds,
        new_connection_each=False,
        max_qps_per_worker=s.max_qps_per_worker,
    )
    log("direct: one big download")
    download = gen.curl_download(
        url=f"https://{LOOPBACK}:{up.https}{BIG_PATH}", proxy_port=None, max_seconds=60
    )
    return Direct(http, latency, new_tls, keepalive, download)


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
    c, pid = s.connections, server.pid
    time.sleep(s.idle_seconds)  # let start-up work (imports, CA generation) settle
    rss_idle = rss_mib(pid)
    wait0, wall0 = runqueue_wait_seconds(pid), time.monotonic()
    with PeakRss(pid) as peak:
        if s.warmup_seconds > 0:
            gen.wrk_http(
                upstream_port=up.http,
                proxy_port=port,
                connections=c,
                seconds=s.warmup_seconds,
                limit=s.max_requests,
            )
        log(f"{name}: plain HTTP keep-alive")
        cpu0 = cpu_seconds(pid)
        http = gen.wrk_http(
            upstream_port=up.http,
            proxy_port=port,
            connections=c,
            seconds=s.seconds,
            limit=s.max_requests,
        )
        http_cpu = cpu_seconds(pid) - cpu0
        log(f"{name}: latency at c=1")
        latency = gen.wrk_http(
            upstream_port=up.http,
            proxy_port=port,
            connections=1,
            seconds=s.latency_seconds,
            limit=s.max_requests,
        )
        log(f"{name}: new CONNECT tunnels")
        cpu0 = cpu_seconds(pid)
        new_tunnels = gen.hey_https(
            upstream_port=up.https,
            proxy_port=port,
            connections=c,
            seconds=s.seconds,
            new_connection_each=True,
            max_qps_per_worker=s.max_qps_per_worker,
        )
        tunnels_cpu = cpu_seconds(pid) - cpu0
        log(f"{name}: long-lived tunnels")
        long_tunnels = gen.hey_https(
            upstream_port=up.https,
            proxy_port=port,
            connections=c,
            seconds=s.seconds,
            new_connection_each=False,
            max_qps_per_worker=s.max_qps_per_worker,
        )
        log(f"{name}: one big download")
        cpu0 = cpu_seconds(pid)
        download = gen.curl_download(
            url=f"https://{LOOPBACK}:{up.https}{BIG_PATH}", proxy_port=port, max_seconds=60
        )
        download_cpu = cpu_seconds(pid) - cpu0
    load_seconds = time.monotonic() - wall0
    cpu_wait = runqueue_wait_seconds(pid) - wait0
    if download.status != 200 or download.size != s.big_bytes:
        notes.append(f"{name}: big download got {download.status}, {download.size} bytes")
    return ProxyRun(
        name=name,
        http=_checked(f"{name} HTTP keep-alive", http, notes),
        http_cpu_s=http_cpu,
        latency=_checked(f"{name} latency c=1", latency, notes),
        new_tunnels=_checked(f"{name} new tunnels", new_tunnels, notes),
        new_tunnels_cpu_s=tunnels_cpu,
        long_tunnels=_checked(f"{name} long-lived tunnels", long_tunnels, notes),
        download=download,
        download_cpu_s=download_cpu,
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
