"""SIGTERM drains: in-flight downloads and tunnels finish (or are cut at the drain timeout), every
span reaches the OTLP receiver, new connections are refused, the exit code is 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.proxy.lifecycle_support import CHUNK, Ports, SlowUpstream, launch
from tests.support.faults import Blackhole
from tests.support.otlp import STATUS_ERROR, OtlpHttpReceiver
from tests.support.sidecar import Sidecar

SLOW = "127.0.0.6"


@pytest.fixture(scope="module")
def slow() -> Iterator[SlowUpstream]:
    server = SlowUpstream(SLOW)
    yield server
    server.stop()


def _start(tmp: Path, slow: SlowUpstream, otlp: OtlpHttpReceiver, *args: str) -> Sidecar:
    return launch(
        tmp,
        Ports.free(),
        allowlist=f"allow:\n  - host: slow.test\n    ports: [{slow.port}]\n",
        hosts={"slow.test": SLOW},
        args=["--allow-private-range", "127.0.0.0/8", *args],
        # The batch processor's default 5 s delay: spans arrive only if the exit flushes them.
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
    )


@dataclass
class Download:
    """A GET through the explicit proxy, read chunk by chunk on a thread of its own."""

    sidecar: Sidecar
    port: int
    chunks: int
    delay: float
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    received: int = 0
    status: int | None = None
    error: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://slow.test:{self.port}/{self.tag}?chunks={self.chunks}&delay={self.delay}"

    @property
    def size(self) -> int:
        return self.chunks * CHUNK

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        assert self.started.wait(10), "the download did not start"
        return thread

    def _run(self) -> None:
        proxies = {"http": self.sidecar.proxy_url}
        try:
            with requests.get(self.url, proxies=proxies, stream=True, timeout=30) as resp:
                self.status = resp.status_code
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    self.received += len(chunk)
                    self.started.set()
        except Exception as err:  # the cut is what some tests expect
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.finished_at = time.monotonic()
            self.started.set()


def _log_lines(sidecar: Sidecar, msg: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in list(sidecar.stderr) if x.startswith("{")]
    return [x for x in lines if x.get("msg") == msg]


def test_sigterm_lets_a_download_in_progress_finish_and_flushes_its_span(
    tmp_path: Path, slow: SlowUpstream, otlp_http: OtlpHttpReceiver
) -> None:
    sidecar = _start(tmp_path, slow, otlp_http)  # the default drain timeout
    download = Download(sidecar, slow.port, chunks=30, delay=0.1)  # ~3 s
    thread = download.start()
    signalled = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    # Readiness turns 503 at once, liveness stays 200, and the listener no longer accepts.
    deadline = time.monotonic() + 2
    while sidecar.health("/healthz/ready")[0] != 503:
        assert time.monotonic() < deadline, "readiness still 200 after SIGTERM"
        time.sleep(0.02)
    assert sidecar.health("/healthz/live")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sidecar.explicit_port), timeout=2).close()
    thread.join(15)
    assert download.error is None, download.error
    assert (download.status, download.received) == (200, download.size)
    assert sidecar.proc.wait(15) == 0, sidecar.stderr[-10:]
    assert download.finished_at is not None and download.finished_at - signalled > 1.5
    span = otlp_http.sink.wait_for(
        lambda s: download.tag in str(s.attributes.get("url.full")), timeout=5
    )[0]
    assert span.name == "GET" and span.status_code != STATUS_ERROR
    assert span.attributes["http.response.status_code"] == 200
    assert not any("ignoring" in line.lower() for line in sidecar.stderr)
    [drained] = _log_lines(sidecar, "drained")
    assert (drained["in_flight"], drained["drained"], drained["cut"]) == (1, 1, 0)


def test_the_drain_timeout_cuts_a_download_and_a_tunnel_and_ends_their_spans(
    tmp_path: Path, slow: SlowUpstream, otlp_http: OtlpHttpReceiver
) -> None:
    sidecar = _start(tmp_path, slow, otlp_http, "--drain-timeout", "1")
    tunnel, head = sidecar.connect_tunnel(f"slow.test:{slow.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    download = Download(sidecar, slow.port, chunks=100, delay=0.1)  # ~10 s
    thread = download.start()
    signalled = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    tunnel.settimeout(10)
    assert tunnel.recv(1) == b""  # the sidecar closed the tunnel
    tunnel_cut = time.monotonic() - signalled
    tunnel.close()
    thread.join(15)
    assert sidecar.proc.wait(15) == 0, sidecar.stderr[-10:]
    exited = time.monotonic() - signalled
    assert 0.9 <= tunnel_cut < 4, tunnel_cut
    assert exited < 6, exited
    assert download.received < download.size
    span = otlp_http.sink.wait_for(
        lambda s: download.tag in str(s.attributes.get("url.full")), timeout=5
    )[0]
    assert span.status_code == STATUS_ERROR
    assert "shut down" in str(span.attributes["egress.upstream.error"])
    otlp_http.sink.wait_for(
        lambda s: (
            s.name == "CONNECT"
            and s.attributes.get("server.port") == slow.port
            and s.resource.get("service.name") is not None
        ),
        timeout=5,
    )
    [cut] = _log_lines(sidecar, "drain timeout: cut what was still in flight")
    assert (cut["in_flight"], cut["drained"], cut["cut"]) == (2, 0, 2)


def test_a_second_sigterm_cuts_at_once(
    tmp_path: Path, slow: SlowUpstream, otlp_http: OtlpHttpReceiver
) -> None:
    sidecar = _start(tmp_path, slow, otlp_http)  # default: 20 s
    download = Download(sidecar, slow.port, chunks=100, delay=0.1)
    thread = download.start()
    sidecar.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    second = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(10) == 0
    assert time.monotonic() - second < 3
    thread.join(5)
    assert download.received < download.size
    [cut] = _log_lines(sidecar, "drain timeout: cut what was still in flight")
    assert cut["cut"] == 1 and cut["cut_short"] is True


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_hung_collector_holds_the_exit_no_longer_than_the_flush_timeout(
    tmp_path: Path, slow: SlowUpstream, protocol: str
) -> None:
    # The SDK alone waited ~30 s on a blackhole collector: past the pod's grace period.
    hole = Blackhole()
    try:
        sidecar = launch(
            tmp_path,
            Ports.free(),
            allowlist=f"allow:\n  - host: slow.test\n    ports: [{slow.port}]\n",
            hosts={"slow.test": SLOW},
            args=["--allow-private-range", "127.0.0.0/8", "--flush-timeout", "2"],
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": hole.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            },
        )
        proxies = {"http": sidecar.proxy_url}
        for n in range(3):  # spans queued for export when the signal comes
            url = f"http://slow.test:{slow.port}/{n}?chunks=1&delay=0"
            assert requests.get(url, proxies=proxies, timeout=10).status_code == 200
        began = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(20) == 0, sidecar.stderr[-10:]
        took = time.monotonic() - began
        assert took < 2 + 4, f"exit took {took:.1f} s with --flush-timeout 2"
        warning = (
            "span export did not finish before --flush-timeout; the spans still queued are dropped"
        )
        assert _log_lines(sidecar, warning), sidecar.stderr[-10:]
    finally:
        hole.stop()
