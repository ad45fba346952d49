"""Runs `egress-sidecar run` as a real process, as it runs in a pod.

Host names resolve through a hosts file bind-mounted over /etc/hosts inside a private mount
namespace of the sidecar process only (`unshare -m`): the machine's /etc/hosts is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hosts import hosts_file, with_hosts
from tests.support.sockets import recv_head

BIN = Path(sys.executable).parent


def sidecar_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without OTEL_* and proxy variables, then ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return full_env


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: the probe sockets stay bound until all are picked (one
    closed before the next bind may hand the same port out twice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Sidecar:
    proc: subprocess.Popen[str]
    explicit_port: int
    transparent_port: int
    health_port: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.explicit_port}"

    def connect_tunnel(self, authority: str) -> tuple[socket.socket, bytes]:
        """Send a CONNECT to the explicit port; the socket and the response head as received."""
        sock = socket.create_connection(("127.0.0.1", self.explicit_port), timeout=10)
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        return sock, recv_head(sock, bufsize=4096)

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()

    def start_pumps(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(
            target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True
        ).start()
        threading.Thread(
            target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True
        ).start()

    def decisions(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(line) for line in self.stdout if line.startswith("{")]

    def wait_decisions(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda d: True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    d
                    for d in (json.loads(x) for x in self.stdout if x.startswith("{"))
                    if predicate(d)
                ]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"expected {count} decision(s), got {found}; stdout={self.stdout[-20:]}; "
                        f"stderr={self.stderr[-20:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def health(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode()

    def policy_version(self) -> str:
        """The version of the policy in force, as the readiness body names it ("" before one
        is loaded). Read from its field: the body's whole text also holds ports and counts, in
        which a version's digits can turn up."""
        body = json.loads(self.health("/healthz/ready")[1])
        policy = body.get("policy") or {}
        return str(policy.get("version", ""))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if self.health("/healthz/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(
            f"sidecar not ready (exit {self.proc.poll()}): stderr={self.stderr[-30:]}"
        )

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_sidecar(
    workdir: Path,
    *,
    allowlist: str | None = None,
    hosts: Mapping[str, str] | None = None,
    extra_hosts: Sequence[str] = (),
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    ports: tuple[int, int, int] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Sidecar:
    """`egress-sidecar run` on 127.0.0.1: on ``ports`` (explicit, transparent, health) when
    given, else on free ones; ``preexec_fn`` runs in the child before exec."""
    workdir.mkdir(parents=True, exist_ok=True)
    explicit, transparent, health = ports or tuple(free_ports(3))
    argv = [
        str(BIN / "egress-sidecar"),
        "run",
        "--explicit-listen",
        f"127.0.0.1:{explicit}",
        "--transparent-listen",
        f"127.0.0.1:{transparent}",
        "--transparent-listen6",
        "off",
        # Not 127.0.0.1:15053: sidecars run side by side here (a test gives --dns-listen).
        "--dns-listen",
        "off",
        "--health-listen",
        f"127.0.0.1:{health}",
        "--confdir",
        str(workdir / "confdir"),
    ]
    if allowlist is not None:
        path = workdir / "allowlist.yaml"
        path.write_text(allowlist)
        argv += ["--allowlist-file", str(path)]
    argv += list(args)
    full_env = sidecar_env(env)
    command = with_hosts(hosts_file(workdir / "hosts", hosts or {}, extra_hosts), argv)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        preexec_fn=preexec_fn,  # noqa: PLW1509 (the callers' only set rlimits, before exec)
    )
    sidecar = Sidecar(proc, explicit, transparent, health)
    sidecar.start_pumps()
    if wait:
        sidecar.wait_ready()
    return sidecar
