"""The processes under test and the upstream: started on loopback, ready-checked, stopped."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.configs import (
    BIG_PATH,
    LOOPBACK,
    UpstreamPorts,
    allowlist_yaml,
    nginx_conf,
    squid_conf,
    write_self_signed,
)
from bench.hosts import IMAGE_ENV, hosts_file, in_root, with_hosts
from bench.loadgen import clean_env


class ServerError(RuntimeError):
    """A server did not start or become ready; the message carries the tail of its log."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: the probe sockets stay bound until all are
    picked (one closed before the next bind may hand the same port out twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _health_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz/ready", timeout=1) as r:
            return int(r.status) == 200
    except (OSError, urllib.error.HTTPError):
        return False


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.log)}"
                )
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"{self.name} not ready within {timeout:.0f} s:\n{_tail(self.log)}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    stdout: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Server:
    with log.open("wb") as err, (stdout or log).open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**server_env(), **(env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches only the bench
        )
    return Server(name, proc, log)


def server_env() -> dict[str, str]:
    env = clean_env()
    for key in list(env):
        if key.startswith("OTEL_"):
            del env[key]  # no trace export unless a scenario asks for it
    return env


def start_nginx(
    nginx: str,
    prefix: Sequence[str],
    workdir: Path,
    big_bytes: int,
    *,
    address: str = LOOPBACK,
    ports: UpstreamPorts | None = None,
    ready: Callable[[UpstreamPorts], bool] | None = None,
) -> tuple[Server, UpstreamPorts]:
    """nginx on ``address`` (free loopback ports unless ``ports``); ``ready`` checks that it
    accepts (default: connect from here, which needs ``address`` reachable from here)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "www").mkdir(exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "nginx-temp" / sub).mkdir(parents=True, exist_ok=True)
    big = workdir / "www" / BIG_PATH.lstrip("/")
    chunk = os.urandom(1 << 20)  # random: nothing on the path can compress it
    with big.open("wb") as f:
        left = big_bytes
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
    cert, key = workdir / "upstream.crt", workdir / "upstream.key"
    write_self_signed(cert, key)
    ports = ports or UpstreamPorts(*free_ports(2))
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, ports, cert, key, address))
    server = _spawn(
        "nginx", [*prefix, nginx, "-p", str(workdir), "-c", str(conf)], workdir / "nginx.log"
    )
    up = ports
    server.wait(
        (lambda: ready(up))
        if ready is not None
        else (lambda: port_open(up.http, address) and port_open(up.https, address)),
        15,
    )
    return server, ports


def start_squid(
    squid: str, prefix: Sequence[str], workdir: Path, upstream: UpstreamPorts
) -> tuple[Server, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # As root Squid drops to its cache_effective_user, which must write its logs here.
        try:
            user = pwd.getpwnam("proxy")
            os.chown(workdir, user.pw_uid, user.pw_gid)
        except KeyError:
            pass
        for parent in [workdir, *workdir.parents]:
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)  # traversable, not listable
    port = free_port()
    conf = workdir / "squid.conf"
    conf.write_text(squid_conf(workdir, port, upstream))
    server = _spawn("squid", [*prefix, squid, "-N", "-f", str(conf)], workdir / "squid.log")
    server.wait(lambda: port_open(port), 20)
    return server, port


@dataclass
class Sidecar:
    server: Server
    port: int
    health_port: int


# Where the image installs the sidecar (Dockerfile).
IMAGE_SIDECAR = "/opt/venv/bin/egress-sidecar"


def sidecar_argv(
    allowlist: Path, workdir: Path, *, image: bool = False
) -> tuple[list[str], int, int]:
    """`egress-sidecar run` on free loopback ports (no IPv6 listener); the argv, the explicit
    proxy's port and the health port. ``image``: the image's command, not this venv's."""
    port, transparent, health = free_ports(3)
    argv = [
        IMAGE_SIDECAR if image else str(Path(sys.executable).parent / "egress-sidecar"),
        "run",
        "--allowlist-file",
        str(allowlist),
        "--allow-private-range",
        "127.0.0.0/8",
        "--explicit-listen",
        f"{LOOPBACK}:{port}",
        "--transparent-listen",
        f"{LOOPBACK}:{transparent}",
        "--transparent-listen6",
        "off",
        "--dns-listen",
        "off",
        "--health-listen",
        f"{LOOPBACK}:{health}",
        "--confdir",
        str(workdir / "confdir"),
    ]
    return argv, port, health


def start_sidecar(
    prefix: Sequence[str],
    workdir: Path,
    upstream: UpstreamPorts,
    *,
    allowlist: str | None = None,
    names: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    root: Path | None = None,
) -> Sidecar:
    """The sidecar on loopback with ``allowlist`` (default: the upstream's address), host
    ``names`` resolved through a hosts file of its own (bench.hosts) and ``env`` on top of the
    OTEL-free environment. ``root``: an image's root filesystem to run the image's sidecar
    from (chroot: its interpreter, its code), as a pod runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "allowlist.yaml"
    path.write_text(allowlist if allowlist is not None else allowlist_yaml(upstream))
    argv, port, health = sidecar_argv(path, workdir, image=root is not None)
    hosts = None
    if names:
        (workdir / "etc").mkdir(exist_ok=True)
        hosts = hosts_file(workdir / "etc" / "hosts", names)
    if root is not None:
        argv = in_root(root, workdir, argv, hosts)
        env = {**IMAGE_ENV, **(env or {})}
    elif hosts is not None:
        argv = with_hosts(hosts, argv)
    argv = [*prefix, *argv]
    server = _spawn(
        "egress-sidecar",
        argv,
        workdir / "sidecar-stderr.log",
        workdir / "decisions.jsonl",
        env,
    )
    server.wait(lambda: _health_ready(health), 60)
    return Sidecar(server, port, health)
