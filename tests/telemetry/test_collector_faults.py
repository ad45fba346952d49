"""The trace collector absent, a blackhole, or killed mid-run, over both OTLP protocols: every
request through the real sidecar is still answered, none waits for span export, and the sidecar's
memory stays bounded (spans leave through a bounded batch queue, off the request path).

Each case runs the same request mix through a sidecar exporting to the faulty collector and
compares its latencies with a control sidecar that exports nothing, started in the same module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.faults import Blackhole, RssSampler, rss_bytes
from tests.support.otlp import OtlpGrpcReceiver, OtlpHttpReceiver
from tests.support.sidecar import Sidecar, free_port, start_sidecar
from tests.support.upstream import UpstreamServer

WEB = "127.0.0.3"
REQUESTS = 150  # a third of them denied (always sampled, so always exported)
# A small batch queue, so that a collector that never answers fills it within the run and the
# "queue full, drop" path is exercised too (the default is 2,048 spans).
QUEUE = "64"


@dataclass
class Run:
    latencies: list[float]  # seconds, one per request
    statuses: list[int]
    rss_peak_growth: int  # bytes above the RSS measured after the warm-up requests

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)


@pytest.fixture(scope="module")
def web() -> Iterator[UpstreamServer]:
    server = UpstreamServer(WEB, label="web").start()
    yield server
    server.stop()


def _start(tmp: Path, web: UpstreamServer, env: dict[str, str]) -> Sidecar:
    return start_sidecar(
        tmp,
        allowlist=f"allow:\n  - host: web.test\n    ports: [{web.port}]\n",
        hosts={"web.test": WEB, "denied.test": WEB},
        args=["--allow-private-range", "127.0.0.0/8"],
        env={
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_BSP_MAX_QUEUE_SIZE": QUEUE,
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32",
            # Each export to a dead collector gives up after 2 s instead of 10 s, which keeps the
            # shutdown's final flush (and so this test) short; the request path never sees it.
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            "OTEL_SERVICE_NAME": "collector-faults",
            **env,
        },
    )


def _drive(sidecar: Sidecar, web: UpstreamServer, midway: Callable[[], None] = lambda: None) -> Run:
    """REQUESTS keep-alive requests, one at a time; ``midway`` runs after half of them."""
    session = requests.Session()
    session.proxies = {"http": sidecar.proxy_url}
    latencies: list[float] = []
    statuses: list[int] = []
    warm = 0
    sampler: RssSampler | None = None
    for i in range(REQUESTS):
        if i == 20:  # imports, first connections and caches are warm by now
            sampler = RssSampler(sidecar.proc.pid)
            warm = sampler.start
        if i == REQUESTS // 2:
            midway()
        host = "denied.test" if i % 3 == 0 else "web.test"
        started = time.monotonic()
        r = session.get(f"http://{host}:{web.port}/r{i}", timeout=10)
        latencies.append(time.monotonic() - started)
        statuses.append(r.status_code)
    assert sampler is not None
    peak = sampler.stop()
    session.close()
    return Run(latencies, statuses, peak - warm)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory, web: UpstreamServer) -> Run:
    """The same requests through a sidecar with no exporter at all."""
    sidecar = _start(tmp_path_factory.mktemp("control"), web, {})
    try:
        return _drive(sidecar, web)
    finally:
        assert sidecar.stop() == 0, sidecar.stderr[-20:]


@dataclass
class Collector:
    endpoint: str
    midway: Callable[[], None]  # what happens to it after half of the requests
    stop: Callable[[], None]
    spans: Callable[[], int]  # spans it received (0 where it cannot tell)


def _absent(protocol: str) -> Collector:
    return Collector(f"http://127.0.0.1:{free_port()}", lambda: None, lambda: None, lambda: 0)


def _blackhole(protocol: str) -> Collector:
    hole = Blackhole()
    return Collector(hole.endpoint, lambda: None, hole.stop, lambda: 0)


def _killed(protocol: str) -> Collector:
    receiver: OtlpHttpReceiver | OtlpGrpcReceiver = (
        OtlpGrpcReceiver() if protocol == "grpc" else OtlpHttpReceiver()
    )
    stopped: list[bool] = []

    def kill() -> None:
        # The spans of the first half reach it before it goes away.
        receiver.sink.wait_for(lambda s: s.resource.get("service.name") == "collector-faults")
        receiver.stop()
        stopped.append(True)

    def stop() -> None:
        if not stopped:
            receiver.stop()

    return Collector(receiver.endpoint, kill, stop, lambda: len(receiver.sink.spans))


FAULTS = {"absent": _absent, "blackhole": _blackhole, "killed": _killed}


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_requests_never_wait_for_a_faulty_collector(
    tmp_path: Path, web: UpstreamServer, control: Run, fault: str, protocol: str
) -> None:
    collector = FAULTS[fault](protocol)
    sidecar = _start(
        tmp_path,
        web,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        },
    )
    try:
        run = _drive(sidecar, web, collector.midway)
        rss_end = rss_bytes(sidecar.proc.pid)
        # Export failures are logged as one line each, never as an unhandled exception.
        tracebacks = [line for line in sidecar.stderr if "Traceback" in line]
        stop_started = time.monotonic()
        code = sidecar.stop(timeout=30)
        stop_took = time.monotonic() - stop_started
    finally:
        sidecar.stop()
        collector.stop()
    expected = [403 if i % 3 == 0 else 200 for i in range(REQUESTS)]
    print(
        f"\n{fault} {protocol}: p50 {run.p50 * 1000:.1f} ms (control {control.p50 * 1000:.1f} ms),"
        f" max {max(run.latencies) * 1000:.0f} ms, RSS growth {run.rss_peak_growth >> 10} KiB"
        f" (end {rss_end >> 20} MiB), stop {stop_took:.1f} s, spans received"
        f" {collector.spans()}"
    )
    assert run.statuses == expected  # every request answered, and decided as the policy says
    # Export is off the request path: an export blocked on a collector that never answers
    # (10 s timeout) or retrying a refused one would show here as seconds, not milliseconds.
    assert max(run.latencies) < 2.0, sorted(run.latencies)[-5:]
    # Generous for two busy shared cores; the median would be seconds if requests waited.
    assert run.p50 <= 2 * control.p50 + 0.010, (run.p50, control.p50)
    assert run.rss_peak_growth < 32 << 20
    assert code == 0, sidecar.stderr[-20:]
    assert stop_took < 15, stop_took  # shutdown's final flush gives up on a dead collector
    assert tracebacks == [], tracebacks
    if fault == "killed":
        assert collector.spans() > 0
