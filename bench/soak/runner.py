"""One soak run: nginx and the sidecar on loopback, the allowlist flipping, clients, sampling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.configs import LOOPBACK
from bench.hosts import hosts_file, with_hosts
from bench.procstat import cpu_seconds, rss_mib
from bench.servers import ServerError, server_env, sidecar_argv, start_nginx
from bench.soak.clients import Target, run_clients
from bench.soak.model import (
    HOSTS,
    MAX_SOURCES,
    DecisionLine,
    Flip,
    PolicyVersion,
    Report,
    RequestResult,
    Sample,
    Tolerance,
    build_report,
    parse_applied_line,
    parse_decision_line,
    summarize_resources,
    versions,
)
from bench.tools import which

Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    seconds: float = 300.0
    clients: int = 500
    flip_interval: float = 2.0
    warmup_seconds: float = 5.0
    settle_seconds: float = 5.0
    timeout: float = 10.0  # per request
    max_requests: int = 2_000_000
    sample_interval: float = 1.0
    tolerance: Tolerance = field(default_factory=Tolerance)


class SoakError(RuntimeError):
    """The soak could not run (a process did not start); the message says which."""


class SidecarDiedError(SoakError):
    """The sidecar exited during the soak: a failure of the sidecar, not of the harness."""


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    port: int
    health_port: int
    decisions: Path
    stderr: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self) -> str:
        try:
            return self.stderr.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz/ready", timeout=1) as r:
            return int(r.status) == 200
    except (OSError, urllib.error.HTTPError):
        return False


def start_sidecar(workdir: Path, allowlist: Path) -> Sidecar:
    unshare = which("unshare")
    if unshare is None:
        raise SoakError("unshare (util-linux) is needed to give the sidecar its own /etc/hosts")
    # The soak's host names resolve through a hosts file of the sidecar's own (bench.hosts).
    (workdir / "etc").mkdir(parents=True, exist_ok=True)
    hosts = hosts_file(workdir / "etc" / "hosts", dict.fromkeys(HOSTS.values(), LOOPBACK))
    run, port, health = sidecar_argv(allowlist, workdir)
    argv = with_hosts(hosts, run, unshare)
    env = server_env()
    decisions, stderr = workdir / "decisions.jsonl", workdir / "sidecar-stderr.log"
    with decisions.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    sidecar = Sidecar(proc, port, health, decisions, stderr)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SoakError(f"the sidecar exited with {proc.returncode}:\n{sidecar.tail()}")
        if _ready(health):
            return sidecar
        time.sleep(0.1)
    sidecar.stop()
    raise SoakError(f"the sidecar was not ready within 60 s:\n{sidecar.tail()}")


def sample(pid: int, t: float) -> Sample:
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return Sample(round(t, 2), round(rss_mib(pid), 2), fds, round(cpu_seconds(pid), 2))


class Sampler:
    """The sidecar's RSS, fds and CPU every ``interval`` seconds, in a thread."""

    def __init__(self, pid: int, origin: float, interval: float) -> None:
        self.pid, self.origin, self.interval = pid, origin, interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(sample(self.pid, time.monotonic() - self.origin))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Flipper:
    """Replaces the allowlist file every ``interval`` seconds, alternating the versions.

    Written to a temporary file and renamed over the old one (atomic, like the kubelet's
    ConfigMap volume swap): the sidecar never reads half a file.
    """

    def __init__(self, path: Path, versions_: Sequence[PolicyVersion], interval: float) -> None:
        self.path, self.versions, self.interval = path, versions_, interval
        self.flips: list[Flip] = []
        self._current = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-flipper", daemon=True)

    def write(self, index: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.versions[index].text)
        os.replace(tmp, self.path)
        self._current = index

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            index = (self._current + 1) % len(self.versions)
            self.write(index)
            self.flips.append(Flip(time.time(), self.versions[index].label))

    def __enter__(self) -> Flipper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def read_decisions(path: Path, offset: int) -> list[DecisionLine]:
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", errors="replace")
    return [d for d in map(parse_decision_line, text.splitlines()) if d is not None]


def _settle(seconds: float, sidecar: Sidecar) -> None:
    time.sleep(seconds)
    if sidecar.proc.poll() is not None:
        raise SidecarDiedError(
            f"the sidecar exited with {sidecar.proc.returncode}:\n{sidecar.tail()}"
        )


@contextlib.contextmanager
def _workdir(keep: bool, log: Log) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="egress-soak-"))
    if keep:
        log(f"work directory: {path}")
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def run(
    settings: Settings,
    *,
    keep_workdir: bool = False,
    log: Log = print,
    make_versions: Callable[[Sequence[int]], Sequence[PolicyVersion]] = versions,
) -> Report:
    """The whole soak; ``make_versions`` gives the allowlist versions for the upstream ports
    (a test passes versions whose expectations disagree with their text, to see them caught)."""
    if settings.max_requests > MAX_SOURCES:
        raise SoakError(f"--max-requests above {MAX_SOURCES} (one source address per request)")
    nginx_bin = which("nginx")
    if nginx_bin is None:
        raise SoakError("nginx is needed for the upstream (Debian: apt-get install nginx-light)")
    with _workdir(keep_workdir, log) as work:
        nginx, ports = start_nginx(nginx_bin, (), work / "nginx", big_bytes=1)
        try:
            pair = list(make_versions([ports.http, ports.https]))
            allowlist = work / "allowlist.yaml"
            flipper = Flipper(allowlist, pair, settings.flip_interval)
            flipper.write(0)
            sidecar = start_sidecar(work / "sidecar", allowlist)
            try:
                target = Target(LOOPBACK, sidecar.port, ports.http, ports.https)
                return _measure(
                    settings, sidecar=sidecar, target=target, pair=pair, flipper=flipper, log=log
                )
            finally:
                sidecar.stop()
        finally:
            nginx.stop()


def _measure(
    settings: Settings,
    *,
    sidecar: Sidecar,
    target: Target,
    pair: Sequence[PolicyVersion],
    flipper: Flipper,
    log: Log,
) -> Report:
    pid = sidecar.proc.pid
    # Warm-up at full concurrency, not judged: lazy imports, caches and the allocator's high
    # water mark for this many connections belong in the baseline, not in a "leak".
    warm: list[RequestResult] = []
    if settings.warmup_seconds > 0:
        log(f"warm-up: {settings.clients} clients for {settings.warmup_seconds:g} s")
        warm = asyncio.run(
            run_clients(
                target=target,
                clients=settings.clients,
                seconds=settings.warmup_seconds,
                max_requests=settings.max_requests,
                timeout=settings.timeout,
            )
        )
    _settle(settings.settle_seconds, sidecar)
    offset = sidecar.decisions.stat().st_size  # warm-up decisions are all written by now
    origin = time.monotonic()
    start = sample(pid, 0.0)
    log(
        f"soak: {settings.clients} clients for {settings.seconds:g} s, allowlist flipping every "
        f"{settings.flip_interval:g} s (baseline RSS {start.rss_mib:.1f} MiB, {start.fds} fds)"
    )
    client_cpu0 = time.process_time()
    with Sampler(pid, origin, settings.sample_interval) as sampler:
        with flipper:
            results = asyncio.run(
                run_clients(
                    target=target,
                    clients=settings.clients,
                    seconds=settings.seconds,
                    max_requests=settings.max_requests - len(warm),
                    timeout=settings.timeout,
                    first=len(warm),  # warm-up requests keep their source addresses
                )
            )
        load_seconds = time.monotonic() - origin
        client_cpu = time.process_time() - client_cpu0
        log(f"clients done: {len(results)} requests in {load_seconds:.1f} s; settling")
        _settle(settings.settle_seconds, sidecar)
        end = sample(pid, time.monotonic() - origin)
    lines = read_decisions(sidecar.decisions, offset)
    applied = [
        a
        for a in map(parse_applied_line, sidecar.stderr.read_text(errors="replace").splitlines())
        if a is not None
    ]
    resources = summarize_resources(start, sampler.samples, end, settings.tolerance)
    return build_report(
        results=results,
        lines=lines,
        versions_=pair,
        seconds=load_seconds,
        clients=settings.clients,
        flips=flipper.flips,
        applied=applied,
        resources=resources,
        sidecar_cpu_s=end.cpu_s - start.cpu_s,
        client_cpu_s=client_cpu,
    )


__all__ = ["ServerError", "Settings", "SidecarDiedError", "SoakError", "run"]
