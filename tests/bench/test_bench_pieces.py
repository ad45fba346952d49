"""The bench's new pieces on their own: the generated allowlists (read by the sidecar's own
policy core), the OTLP span counter (fed by the SDK's real http/protobuf exporter), the idle
tunnels' arithmetic and the sidecar-only table."""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import math
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.configs import big_allowlist_yaml, named_allowlist_yaml
from bench.idle import IdleResult
from bench.loadgen import Download, LoadResult
from bench.otlp import SpanCounter
from bench.procstat import CoreBusy
from bench.report import (
    Alternating,
    Direct,
    ExportRun,
    LoadCoreBusy,
    ProxyRun,
    Report,
    RulesRun,
    Settings,
    TransparentRun,
    markdown,
    rows,
    sidecar_rows,
    to_json,
)
from bench.runner import _policy_version
from sidecar.metrics import Metrics
from sidecar.policy import parse_allowlist
from sidecar.policy.model import Destination, Verdict

HOST = "api-0042.payments.rules.bench.test"


def test_the_big_allowlist_has_every_rule_and_allows_the_target_by_its_host_rule() -> None:
    policy = parse_allowlist(big_allowlist_yaml(10_000, HOST, 8080), source="bench")
    host_rules = [r for r in policy.allow_rules if r.host is not None and not r.wildcard]
    assert len(host_rules) == 10_000
    assert sum(r.wildcard for r in policy.allow_rules) == 100
    assert sum(r.network is not None for r in policy.allow_rules) == 100
    allowed = policy.decide(Destination(host=HOST, port=8080))
    assert allowed.verdict is Verdict.ALLOW and allowed.rule is not None
    assert HOST in allowed.rule
    denied = policy.decide(Destination(host="blocked-007.rules.bench.test", port=8080))
    assert denied.verdict is Verdict.DENY


def test_the_small_allowlist_allows_only_the_target_on_its_port() -> None:
    policy = parse_allowlist(named_allowlist_yaml(HOST, 8080), source="bench")
    assert policy.decide(Destination(host=HOST, port=8080)).verdict is Verdict.ALLOW
    assert policy.decide(Destination(host=HOST, port=443)).verdict is Verdict.DENY


def test_span_counter_counts_what_the_sdk_exporter_sends() -> None:
    counter = SpanCounter()
    try:
        provider = TracerProvider()
        exporter = OTLPSpanExporter(endpoint=f"{counter.endpoint}/v1/traces")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("bench-test")
        for i in range(7):
            with tracer.start_as_current_span(f"span-{i}"):
                pass
        assert counter.wait_for(7, timeout=10) == 7
        assert counter.exports == 7 and counter.refused == 0
        provider.shutdown()
    finally:
        counter.stop()


def test_span_counter_refuses_what_is_not_an_export() -> None:
    counter = SpanCounter()
    try:
        for path, body in (("/v1/metrics", b""), ("/v1/traces", gzip.compress(b"\xff\xff"))):
            request = urllib.request.Request(
                counter.endpoint + path,
                data=body,
                headers={"content-encoding": "gzip"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=5)
            assert err.value.code == 400
        assert (counter.spans, counter.exports, counter.refused) == (0, 0, 2)
        # nothing arrives: the wait ends after the quiet time, not the timeout
        assert counter.wait_for(1, timeout=10, quiet=0.2) == 0
    finally:
        counter.stop()


def test_idle_kib_per_connection() -> None:
    r = IdleResult(2000, 2000, 0, 30.0, 80.0, 3.0)
    assert r.kib_per_connection == pytest.approx(50 * 1024 / 2000)
    assert math.isnan(IdleResult(10, 0, 10, 30.0, 30.0, 1.0).kib_per_connection)


def _load(ok: int, seconds: float = 1.0) -> LoadResult:
    return LoadResult(ok=ok, errors=0, seconds=seconds, p50_ms=1.0, p99_ms=2.0)


def _proxy(name: str, http_ok: int, http_cpu: float, idle: IdleResult | None) -> ProxyRun:
    return ProxyRun(
        name=name,
        http=_load(http_ok),
        http_cpu_s=http_cpu,
        latency=_load(100),
        new_tunnels=_load(400),
        new_tunnels_cpu_s=1.0,
        long_tunnels=_load(1000),
        long_tls_tunnels=_load(500),
        download=Download(200, 1_000_000, 0.01),
        download_cpu_s=0.01,
        download_tls=Download(200, 1_000_000, 0.02),
        rss_idle_mib=30.0,
        rss_peak_mib=35.0,
        load_seconds=10.0,
        cpu_wait_s=0.0,
        idle=idle,
        rss_peak_all_mib=90.0,
    )


def _report() -> Report:
    return Report(
        when="now",
        machine="m",
        upstream="u",
        load="l",
        pinning="p",
        settings=Settings(connections=16),
        direct=Direct(
            _load(1),
            _load(1),
            _load(1),
            _load(3000),
            _load(2000),
            Download(200, 1_000_000, 0.001),
            Download(200, 1_000_000, 0.004),
        ),
        baseline=_proxy("Squid", 10_000, 0.6, IdleResult(2000, 2000, 0, 27.0, 90.0, 2.0)),
        sidecar=_proxy("sidecar", 10_000, 1.0, IdleResult(2000, 2000, 0, 30.0, 70.0, 2.0)),
        export=ExportRun(
            _load(10_000), 1.2, _load(12_000), 1.2, 10_016, 10_000, 0.4, 33.0, 38.0, 31.0, 36.0
        ),
        transparent=TransparentRun(_load(5000), 0.5, _load(200), 0.4, 31.0, 120.0, 5200),
        rules=RulesRun(10_000, _load(8000), 0.8, _load(7900), 0.79, 30.0, 31.0, 41.0, 42.0),
    )


def test_sidecar_rows_compare_each_scenario_with_its_reference() -> None:
    rows = {label: (ours, ref, ratio) for label, ours, ref, ratio in sidecar_rows(_report())}
    assert rows["CPU-s per 10k HTTP requests, span export on ↓"] == (
        "1.20",
        "1.00 (export off, same rounds)",
        "1.20x",
    )
    assert rows["RSS idle / peak, MiB, span export on ↓"][1] == "31.0 / 36.0 (export off)"
    assert rows["spans received by the OTLP receiver"][0] == "10,016 of 10,000 requests"
    assert rows["CPU-s per 10k transparent new TLS connections ↓"] == (
        "20.00",
        "25.00 (new CONNECT tunnels)",
        "0.80x",
    )
    assert rows["CPU-s per 10k HTTP requests, 10,000-rule allowlist ↓"][2] == "1.00x"
    assert rows["RSS idle / peak, MiB, transparent ↓"][0] == "31.0 / 120.0"


def test_the_whole_bench_peak_is_the_highest_of_every_sidecar_process() -> None:
    report = _report()
    assert report.sidecar_peak_mib() == 120.0  # the transparent instance's
    table = markdown(report)
    assert "| RSS peak through the whole bench, MiB ↓ | - | 90.0 | 120.0 | 1.33x |" in table
    assert "| RSS per idle tunnel, KiB ↓ | - | 32.3 | 20.5 | 0.63x |" in table
    without = dataclasses.replace(report, export=None, transparent=None, rules=None)
    assert sidecar_rows(without) == []
    assert "sidecar scenario" not in markdown(without)


def test_the_edits_of_the_large_allowlist_have_a_row_and_count_in_the_peak() -> None:
    report = _report()
    assert not any("edits" in label for label, *_ in sidecar_rows(report))  # none measured
    assert report.rules is not None
    rules = dataclasses.replace(
        report.rules, edits=8, large_rss_edited_mib=45.5, large_rss_edit_peak_mib=130.0
    )
    edited = dataclasses.replace(report, transparent=None, rules=rules)
    rows = {label: (ours, ref) for label, ours, ref, _ in sidecar_rows(edited)}
    assert rows["RSS after 8 edits / peak, MiB, 10,000-rule allowlist ↓"] == (
        "45.5 / 130.0",
        "41.0 / 42.0 (before)",
    )
    assert edited.sidecar_peak_mib() == 130.0


def test_the_policy_version_is_read_from_the_sidecars_metrics() -> None:
    metrics = Metrics()
    metrics.policy_info.labels(source="file:/a.yaml", version="abc123").set(1)
    metrics.policy_info.labels(source="file:/a.yaml", version="old").set(0)
    text = metrics.render().decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode() if self.path == "/metrics" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _policy_version(server.server_address[1]) == "abc123"
    finally:
        server.shutdown()
        server.server_close()
    assert _policy_version(server.server_address[1]) is None  # nothing listening


def test_the_one_tunnel_rows_say_what_is_inside_the_tunnel() -> None:
    """The target rows carry plain HTTP (the proxy bound); the TLS-inside rows follow them."""
    table = {label: (direct, theirs, ours) for label, direct, theirs, ours, _, _ in rows(_report())}
    assert table["long-lived tunnels req/s, c=16"] == ("3,000", 1000.0, 1000.0)
    assert table["long-lived TLS tunnels req/s (hey), c=16"] == ("2,000", 500.0, 500.0)
    assert table["100 MB via one tunnel, MB/s"] == ("1,000", 100.0, 100.0)
    assert table["100 MB via one tunnel, TLS inside, MB/s"] == ("250", 50.0, 50.0)
    labels = list(table)
    assert labels.index("CPU-s per GB through one tunnel") + 1 == labels.index(
        "long-lived TLS tunnels req/s (hey), c=16"
    )
    assert "tunload" in markdown(_report())
    failed = dataclasses.replace(
        _proxy("sidecar", 10, 1.0, None), download_tls=Download(502, 0, 0.1)
    )
    assert failed.errors == 1  # a failed TLS download counts, as the other one does


def test_json_has_both_tables_and_no_nan() -> None:
    report = dataclasses.replace(
        _report(), sidecar=_proxy("sidecar", 0, 1.0, None), transparent=None
    )
    data = to_json(report)
    cpu = next(r for r in data["table"] if r["scenario"] == "CPU-s per 10k HTTP requests")
    assert cpu["sidecar"] is None  # NaN (no request succeeded) is null, not NaN
    assert data["run"]["sidecar"]["idle"] is None
    assert len(data["sidecar_scenarios"]) == len(sidecar_rows(report))


def test_the_rounds_loaded_in_turn_sit_under_the_main_cpu_rows() -> None:
    report = dataclasses.replace(
        _report(),
        alternating=Alternating(
            squid_http=_load(20_000),
            squid_http_cpu_s=2.0,
            http=_load(10_000),
            http_cpu_s=1.5,
            squid_tunnels=_load(1_000),
            squid_tunnels_cpu_s=0.4,
            tunnels=_load(1_000),
            tunnels_cpu_s=0.5,
            squid_long=_load(8_000),
            long=_load(6_000),
            squid_downloads=(Download(200, 100_000_000, 0.2), Download(200, 100_000_000, 0.3)),
            squid_downloads_cpu_s=0.1,
            downloads=(Download(200, 100_000_000, 0.25), Download(200, 100_000_000, 0.25)),
            downloads_cpu_s=0.3,
            rss_peak_mib=150.0,
            squid_long_cpu_s=1.6,
            long_cpu_s=0.9,
            squid_load_core=LoadCoreBusy(0.995, 0.99, 1.0, 0.974),
            load_core=LoadCoreBusy(0.99, 0.98, 0.999, 0.9),
        ),
    )
    table = markdown(report)
    lines = [line for line in table.splitlines() if line.startswith("| CPU-s per 10k ")]
    assert lines[:4] == [
        "| CPU-s per 10k HTTP requests ↓ | - | 0.60 | 1.00 | 1.67x |",
        "| CPU-s per 10k new tunnels ↓ | - | 25.00 | 25.00 | 1.00x |",
        "| CPU-s per 10k HTTP requests, both running, loaded in turn ↓ | - | 1.00 | 1.50 | 1.50x |",
        "| CPU-s per 10k new tunnels, both running, loaded in turn ↓ | - | 4.00 | 5.00 | 1.25x |",
    ]
    assert "loaded in the order Squid, sidecar, sidecar, Squid" in table
    # the one-tunnel rows in turn sit under the main table's: rate over the segments summed,
    # bytes over time of all the downloads (not a mean of rates), CPU per GB of them all
    lines = table.splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("| CPU-s per GB through one"))
    assert lines[at + 1 : at + 5] == [
        "| long-lived tunnels req/s, c=16, both running, loaded in turn ↑ | - | 8,000 | 6,000 "
        "| 0.75x |",
        "| CPU-s per 10k requests in long-lived tunnels, both running, loaded in turn ↓ | - "
        "| 2.00 | 1.50 | 0.75x |",
        "| 100 MB via one tunnel, MB/s, both running, loaded in turn (2 each) ↑ | - | 400 "
        "| 400 "
        "| 1.00x |",
        "| CPU-s per GB through one tunnel, both running, loaded in turn ↓ | - | 0.50 | 1.50 "
        "| 3.00x |",
    ]
    # what bound the rates: the load generators' core, per scenario, as percentages
    assert (
        "| load generators' core busy, loaded in turn: HTTP / new tunnels / long-lived / 100 MB "
        "| - | 100 / 99 / 100 / 97 % | 99 / 98 / 100 / 90 % | |" in table
    )
    assert report.sidecar_peak_mib() == 150.0  # its rounds count for the whole bench's peak
    row = next(
        r
        for r in to_json(report)["table"]
        if r["scenario"] == "CPU-s per 10k new tunnels, both running, loaded in turn"
    )
    assert row["sidecar_over_squid"] == pytest.approx(1.25)
    assert "both running" not in markdown(_report())  # none measured: no row
    assert "core busy" not in markdown(_report())
    assert report.alternating is not None
    unpinned = dataclasses.replace(
        report.alternating,
        squid_load_core=LoadCoreBusy(math.nan, math.nan, math.nan, math.nan),
        load_core=LoadCoreBusy(math.nan, math.nan, math.nan, math.nan),
    )
    assert "| n/a (not pinned) | n/a (not pinned) |" in markdown(
        dataclasses.replace(report, alternating=unpinned)
    )
    busy = to_json(report)["run"]["alternating"]["load_core"]
    assert busy == {"http": 0.99, "tunnels": 0.98, "long": 0.999, "download": 0.9}
    # and the proxy's own share of its core: CPU-seconds over the load's seconds
    assert (
        "| the proxy's own CPU, share of its core, loaded in turn: HTTP / new tunnels / "
        "long-lived / 100 MB | - | 200 / 40 / 160 / 20 % | 150 / 50 / 90 / 60 % | |" in table
    )
    proxy_busy = to_json(report)["proxy_core_busy"]
    assert proxy_busy["sidecar"] == {"http": 1.5, "tunnels": 0.5, "long": 0.9, "download": 0.6}
    assert proxy_busy["squid"]["download"] == pytest.approx(0.2)
    assert to_json(_report())["proxy_core_busy"] is None


def test_core_busy_reads_a_cpu_kept_busy() -> None:
    """CoreBusy on the real /proc/stat: a process spinning on one CPU makes it read busy."""
    cpu = max(os.sched_getaffinity(0))
    spin = (
        f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
        "end = time.monotonic() + 0.6\nwhile time.monotonic() < end: pass\n"
    )
    busy = CoreBusy(cpu)
    with busy:
        assert subprocess.run([sys.executable, "-c", spin], check=False, timeout=30).returncode == 0
    assert busy.total > 0
    assert busy.share > 0.5, (busy.busy, busy.total)
