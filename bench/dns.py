"""The DNS listener under load: queries per second and the latency it adds per query, against
the same authoritative server asked directly.

The server is the tests' dnspython one (tests/support/dnsauth.py) on a random 127/8 address's
port 53 (root: that is why the scenario needs it); the sidecar's resolv.conf names it. The load
is this module run as its own process (``python -m bench.dns load ...``): ``concurrency``
asyncio workers, one UDP socket each, one query in flight per worker, bounded in time and in
count. Three loads: direct; through the sidecar for an allowed name (forwarded, its answer
screened and learned); through the sidecar for an unlisted name (NXDOMAIN made by the sidecar,
no upstream). Latency at c=1, direct and through the sidecar, for the allowed name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dns.message
import dns.rcode

from bench.configs import LOOPBACK
from bench.loadgen import LoadResult, checked, clean_env
from bench.procstat import PeakRss, cpu_seconds, rss_mib
from bench.report import DnsRun, Settings
from bench.servers import free_port, sidecar_argv

Log = Callable[[str], None]

DNSAUTH = Path(__file__).resolve().parents[1] / "tests" / "support" / "dnsauth.py"
ALLOWED = "api.bench.test"
DENIED = "unlisted.bench.test"
ZONE = {ALLOWED: [["A", "93.184.216.34", 300]], DENIED: [["A", "93.184.216.35", 300]]}
QUERY_TIMEOUT = 2.0


class DnsUnavailableError(RuntimeError):
    """The machine cannot run the scenario (not root: port 53); the message says."""


# -- the load generator (its own process) -------------------------------------------------------


async def _worker(
    address: str,
    port: int,
    name: str,
    *,
    deadline: float,
    budget: list[int],
    latencies: list[float],
    errors: list[int],
    expect: int,
) -> None:
    loop = asyncio.get_running_loop()
    wire = bytearray(dns.message.make_query(name, "A").to_wire())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((address, port))
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            qid = random.getrandbits(16)
            wire[0:2] = qid.to_bytes(2)
            started = time.perf_counter()
            try:
                await loop.sock_sendall(sock, wire)
                while True:
                    reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), QUERY_TIMEOUT)
                    if reply[0:2] == wire[0:2]:
                        break
            except (TimeoutError, OSError):
                errors[0] += 1
                continue
            if reply[3] & 0x0F != expect:
                errors[0] += 1
                continue
            latencies.append(time.perf_counter() - started)


async def load(
    address: str,
    port: int,
    name: str,
    *,
    concurrency: int,
    seconds: float,
    limit: int,
    expect: int,
) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    budget = [limit]
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _worker(
                address,
                port,
                name,
                deadline=deadline,
                budget=budget,
                latencies=latencies,
                errors=errors,
                expect=expect,
            )
            for _ in range(concurrency)
        )
    )
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "ok": len(latencies),
        "errors": errors[0],
        "seconds": elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def _load_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dns load")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p.add_argument("name")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--limit", type=int, default=500_000)
    p.add_argument("--expect", choices=["NOERROR", "NXDOMAIN"], default="NOERROR")
    a = p.parse_args(argv)
    expect = dns.rcode.from_text(a.expect)
    result = asyncio.run(
        load(
            a.address,
            a.port,
            a.name,
            concurrency=a.concurrency,
            seconds=a.seconds,
            limit=a.limit,
            expect=int(expect),
        )
    )
    print(json.dumps(result))


# -- the scenario ------------------------------------------------------------------------------


def _run_load(
    prefix: Sequence[str],
    address: str,
    port: int,
    name: str,
    *,
    concurrency: int,
    seconds: float,
    limit: int,
    expect: str = "NOERROR",
) -> LoadResult:
    argv = [*prefix, sys.executable, "-m", "bench.dns", "load", address, str(port), name]
    argv += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    argv += ["--limit", str(limit), "--expect", expect]
    repo = Path(__file__).resolve().parents[1]
    env = {**clean_env(), "PYTHONPATH": str(repo)}
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, env=env, check=True, cwd=repo
    ).stdout
    r = json.loads(out)
    return LoadResult(int(r["ok"]), int(r["errors"]), r["seconds"], r["p50_ms"], r["p99_ms"])


def _start_auth(workdir: Path, address: str, prefix: Sequence[str]) -> subprocess.Popen[bytes]:
    zone, ready = workdir / "zone.json", workdir / "auth.ready"
    zone.write_text(json.dumps(ZONE))
    # The per-query log goes to /dev/null: kept, it would be the server's main cost.
    argv = [*prefix, sys.executable, str(DNSAUTH), "--zone", str(zone), "--log", os.devnull]
    argv += ["--ready", str(ready), "--listen", f"{address}:53"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("dns: the authoritative server did not start")
        time.sleep(0.05)
    return proc


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = dns.message.make_query(DENIED, "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                sock.sendto(query, (LOOPBACK, port))
                sock.recv(4096)
                return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError("dns: the sidecar's DNS listener did not answer")


def measure_dns(
    s: Settings,
    *,
    proxy_prefix: Sequence[str],
    load_prefix: Sequence[str],
    workdir: Path,
    log: Log,
    notes: list[str],
) -> DnsRun:
    if os.geteuid() != 0:
        raise DnsUnavailableError("needs root (the test server binds port 53 of a 127/8 address)")
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    auth = _start_auth(workdir, address, load_prefix)
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        resolv = workdir / "resolv.conf"
        resolv.write_text(f"nameserver {address}\n")
        allowlist = workdir / "allowlist.yaml"
        allowlist.write_text(f"allow:\n  - {ALLOWED}\n")
        argv, _, _ = sidecar_argv(allowlist, workdir)
        port = free_port()
        # After sidecar_argv's "--dns-listen off": the listener on a free loopback port.
        argv += ["--dns-listen", f"{LOOPBACK}:{port}", "--dns-resolv-conf", str(resolv)]
        with (workdir / "sidecar.log").open("wb") as out:
            sidecar = subprocess.Popen(
                [*proxy_prefix, *argv], stdout=out, stderr=subprocess.STDOUT, env=clean_env()
            )
        _wait_port(port, 30)
        pid = sidecar.pid
        time.sleep(s.idle_seconds)
        rss_idle = rss_mib(pid)
        c, secs, limit = s.connections, float(s.seconds), s.max_requests
        log("dns: direct, through the sidecar (allowed, denied), latency at c=1")
        if s.warmup_seconds > 0:
            warm = float(s.warmup_seconds)
            _run_load(
                load_prefix, LOOPBACK, port, ALLOWED, concurrency=c, seconds=warm, limit=limit
            )
        direct = _run_load(
            load_prefix, address, 53, ALLOWED, concurrency=c, seconds=secs, limit=limit
        )
        with PeakRss(pid) as peak:
            cpu0 = cpu_seconds(pid)
            allowed = _run_load(
                load_prefix, LOOPBACK, port, ALLOWED, concurrency=c, seconds=secs, limit=limit
            )
            allowed_cpu = cpu_seconds(pid) - cpu0
            cpu0 = cpu_seconds(pid)
            denied = _run_load(
                load_prefix,
                LOOPBACK,
                port,
                DENIED,
                concurrency=c,
                seconds=secs,
                limit=limit,
                expect="NXDOMAIN",
            )
            denied_cpu = cpu_seconds(pid) - cpu0
            lat = float(s.latency_seconds)
            direct_lat = _run_load(
                load_prefix, address, 53, ALLOWED, concurrency=1, seconds=lat, limit=limit
            )
            sidecar_lat = _run_load(
                load_prefix, LOOPBACK, port, ALLOWED, concurrency=1, seconds=lat, limit=limit
            )
        return DnsRun(
            direct=checked("dns direct", direct, notes),
            allowed=checked("dns through the sidecar", allowed, notes),
            allowed_cpu_s=allowed_cpu,
            denied=checked("dns denied by the sidecar", denied, notes),
            denied_cpu_s=denied_cpu,
            direct_latency=checked("dns direct c=1", direct_lat, notes),
            latency=checked("dns through the sidecar c=1", sidecar_lat, notes),
            rss_idle_mib=rss_idle,
            rss_peak_mib=peak.peak,
        )
    finally:
        if sidecar is not None:
            sidecar.terminate()
            try:
                sidecar.wait(20)
            except subprocess.TimeoutExpired:
                sidecar.kill()
        auth.kill()
        auth.wait(5)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        _load_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.dns load ADDRESS PORT NAME [...]")
