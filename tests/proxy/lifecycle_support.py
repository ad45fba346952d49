"""Starting the real sidecar on ports the test chooses, so that a test can restart it in place."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.sidecar import Sidecar, free_ports, start_sidecar


@dataclass(frozen=True)
class Ports:
    explicit: int
    transparent: int
    health: int

    @classmethod
    def free(cls) -> Ports:
        explicit, transparent, health = free_ports(3)
        return cls(explicit, transparent, health)


def launch(
    workdir: Path,
    ports: Ports,
    *,
    allowlist: str,
    hosts: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    wait: bool = True,
) -> Sidecar:
    """`egress-sidecar run` on ``ports`` (all on 127.0.0.1), by tests/support/sidecar.py."""
    return start_sidecar(
        workdir,
        allowlist=allowlist,
        hosts=hosts,
        args=args,
        env=env,
        wait=wait,
        ports=(ports.explicit, ports.transparent, ports.health),
        preexec_fn=preexec_fn,
    )


def time_wait_ports() -> set[int]:
    """Local ports of the machine's TCP sockets in TIME_WAIT (ss, as an operator would look)."""
    out = subprocess.run(
        ["ss", "-Htan", "state", "time-wait"], capture_output=True, text=True, check=True
    ).stdout
    ports: set[int] = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            ports.add(int(fields[2].rpartition(":")[2]))
    return ports


def listen_backlog(port: int) -> int:
    """The listen backlog of the socket listening on ``port`` (ss -ltn: Send-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    fields = out.split()
    assert len(fields) >= 4, f"nothing listens on {port}: {out!r}"
    return int(fields[2])


class _SlowHandler(BaseHTTPRequestHandler):
    """GET /anything?chunks=N&delay=S: N chunks of CHUNK bytes, S seconds apart (Content-Length)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        chunks = int(query.get("chunks", ["10"])[0])
        delay = float(query.get("delay", ["0.1"])[0])
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(chunks * CHUNK))
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(chunks):
                self.wfile.write(b"x" * CHUNK)
                self.wfile.flush()
                time.sleep(delay)

    def log_message(self, format: str, *args: Any) -> None:
        pass


CHUNK = 16 * 1024


class SlowUpstream(ThreadingHTTPServer):
    """A plain-HTTP server that streams its answer slowly (a download in progress)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _SlowHandler)
        threading.Thread(target=self.serve_forever, daemon=True, name="slow-upstream").start()

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)  # no reverse DNS lookup (FIELD-NOTES)
        self.server_address = self.socket.getsockname()[:2]

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
