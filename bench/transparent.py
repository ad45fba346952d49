"""Transparent capture in network namespaces: the pod's iptables REDIRECT, the sidecar as UID
1337 in the pod, the load generators in the pod as the app's UID with no proxy settings, nginx
outside. Built with the tests' namespace harness (tests/support/netns.py): addresses only from
198.18.0.0/15, inside namespaces created here and deleted at the end, whatever happens.

Needs root, iproute2, iptables and util-linux (setpriv, unshare).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.configs import UpstreamPorts
from bench.loadgen import Generators, checked
from bench.procstat import PeakRss, cpu_seconds, rss_mib, tree
from bench.report import Settings, TransparentRun
from bench.servers import port_open, start_nginx
from bench.tools import Tools, which
from tests.support import netns as h
from tests.support.netns_pod import in_netns

Log = Callable[[str], None]

APP_UID = 4242  # the app container's user: anything but the proxy's (h.PROXY_UID)
WEB_NAME = "web.bench.test"
WEB_ADDRESS = h.OUT4[0]
PORTS = UpstreamPorts(http=80, https=443)


class TransparentUnavailableError(RuntimeError):
    """The machine cannot build the namespaces (not root, a tool missing); the message says."""


def check_available() -> None:
    if os.geteuid() != 0:
        raise TransparentUnavailableError("needs root (network namespaces, iptables)")
    missing = [t for t in ("ip", "iptables", "setpriv", "unshare") if which(t) is None]
    if missing:
        raise TransparentUnavailableError(f"missing {', '.join(missing)}")


def allowlist() -> str:
    return f"allow:\n  - {WEB_NAME}\n"  # ports 80 and 443: a host rule's default


def pin(pid: int, cpu: int | None) -> None:
    """Move every thread of the process tree to ``cpu`` (new threads inherit it)."""
    if cpu is None:
        return
    for p in tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), {cpu})
            except (OSError, ValueError):
                continue  # the thread ended meanwhile


@dataclass(frozen=True)
class CpuPlan:
    proxy_cpu: int | None
    load_prefix: tuple[str, ...]  # taskset for the load generators and nginx


def measure_transparent(
    tools: Tools, s: Settings, cpus: CpuPlan, log: Log, notes: list[str]
) -> TransparentRun:
    check_available()
    h.reap_stale()
    world = h.create_world()
    try:
        return _measure(world, tools, s, cpus, log=log, notes=notes)
    finally:
        world.close()  # every process in both namespaces, then the namespaces


def _measure(
    w: h.World, tools: Tools, s: Settings, cpus: CpuPlan, *, log: Log, notes: list[str]
) -> TransparentRun:
    log("transparent: namespaces, nginx outside, iptables REDIRECT in the pod, the sidecar")
    outside = w.outside.name

    def ready(ports: UpstreamPorts) -> bool:
        return in_netns(
            outside,
            lambda: port_open(ports.http, WEB_ADDRESS) and port_open(ports.https, WEB_ADDRESS),
        )

    nginx, _ = start_nginx(
        tools.nginx,
        (*w.outside.prefix(), *cpus.load_prefix),
        w.workdir / "nginx",
        1,
        address=WEB_ADDRESS,
        ports=PORTS,
        ready=ready,
    )
    try:
        w.pod.ok([*h.SIDECAR, "iptables", "apply", "--ipv6", "off"], timeout=30)
        sidecar = h.start_pod_sidecar(w, allowlist(), {WEB_NAME: WEB_ADDRESS})
        pid = sidecar.proc.pid  # ip netns exec, unshare, sh and setpriv all exec: the sidecar
        pin(pid, cpus.proxy_cpu)
        time.sleep(s.idle_seconds)
        rss_idle = rss_mib(pid)
        # The app: as APP_UID in the pod, no proxy settings; only the REDIRECT captures it.
        gen = Generators(
            tools.wrk,
            tools.hey,
            tools.curl,
            (*w.pod.prefix(uid=APP_UID), *cpus.load_prefix),
            w.workdir,
        )
        common = {"address": WEB_ADDRESS, "name": WEB_NAME}
        with PeakRss(pid) as peak:
            if s.warmup_seconds > 0:
                gen.wrk_http(
                    upstream_port=PORTS.http,
                    proxy_port=None,
                    connections=s.connections,
                    seconds=s.warmup_seconds,
                    limit=s.max_requests,
                    **common,
                )
            log("transparent: plain HTTP keep-alive")
            cpu0 = cpu_seconds(pid)
            http = gen.wrk_http(
                upstream_port=PORTS.http,
                proxy_port=None,
                connections=s.connections,
                seconds=s.seconds,
                limit=s.max_requests,
                **common,
            )
            http_cpu = cpu_seconds(pid) - cpu0
            log("transparent: new TLS connections")
            cpu0 = cpu_seconds(pid)
            tls = gen.hey_https(
                upstream_port=PORTS.https,
                proxy_port=None,
                connections=s.connections,
                seconds=s.seconds,
                new_connection_each=True,
                max_qps_per_worker=s.max_qps_per_worker,
                **common,
            )
            tls_cpu = cpu_seconds(pid) - cpu0
        decided = h.decisions(sidecar.out)
        # proof that the capture, not a bypass, carried the load: GETs decided on their Host,
        # TLS on its SNI (hey sends -host as the SNI)
        seen = {str(d.get("protocol")) for d in decided if d.get("host") == WEB_NAME}
        if not {"GET", "TLS"} <= seen:
            raise RuntimeError(f"transparent: decisions for {WEB_NAME} only as {sorted(seen)}")
        return TransparentRun(
            http=checked("transparent HTTP", http, notes),
            http_cpu_s=http_cpu,
            new_tls=checked("transparent new TLS", tls, notes),
            new_tls_cpu_s=tls_cpu,
            rss_idle_mib=rss_idle,
            rss_peak_mib=peak.peak,
            decisions=len(decided),
        )
    finally:
        nginx.stop()
