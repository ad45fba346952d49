"""The benchmark harness end to end in a tiny configuration: every scenario yields numbers.

Runs the real thing (nginx, Squid, the sidecar, wrk, hey, curl, the OTLP receiver, network
namespaces with iptables as root) with 1-second scenarios, a 1 MB download, 100 idle tunnels and
a 1,000-rule allowlist: it checks the harness, not the performance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main

LABELS = [
    "HTTP keep-alive req/s, c=4",
    "CPU-s per 10k HTTP requests",
    "new CONNECT tunnels/s, c=4",
    "CPU-s per 10k new tunnels",
    "CPU-s per 10k HTTP requests, both running, loaded in turn",
    "CPU-s per 10k new tunnels, both running, loaded in turn",
    "long-lived tunnels req/s, c=4",
    "1 MB via one tunnel, MB/s",
    "CPU-s per GB through one tunnel",
    "long-lived tunnels req/s, c=4, both running, loaded in turn",
    "CPU-s per 10k requests in long-lived tunnels, both running, loaded in turn",
    "1 MB via one tunnel, MB/s, both running, loaded in turn (12 each)",
    "CPU-s per GB through one tunnel, both running, loaded in turn",
    "long-lived TLS tunnels req/s (hey), c=4",
    "1 MB via one tunnel, TLS inside, MB/s",
    "added p50 latency, c=1, ms",
    "added p99 latency, c=1, ms",
    "RSS idle, MiB",
    "RSS peak under load, MiB",
    "RSS with 100 idle tunnels, MiB",
    "RSS per idle tunnel, KiB",
    "RSS peak through the whole bench, MiB",
]
# The sidecar-only table: label -> whether the reference cell is a number (with its name)
SIDECAR_LABELS = [
    "CPU-s per 10k HTTP requests, span export on",
    "HTTP keep-alive req/s, c=4, span export on",
    "transparent HTTP keep-alive req/s, c=4",
    "CPU-s per 10k transparent HTTP requests",
    "transparent new TLS connections/s, c=4",
    "CPU-s per 10k transparent new TLS connections",
    "HTTP keep-alive req/s, c=4, 1,000-rule allowlist",
    "CPU-s per 10k HTTP requests, 1,000-rule allowlist",
    "DNS queries/s, c=4, allowed name",
    "DNS queries/s, c=4, unlisted name (NXDOMAIN by the sidecar)",
    "CPU-s per 10k DNS queries, allowed / unlisted",
    "DNS added p50 latency per query, c=1, ms",
    "DNS added p99 latency per query, c=1, ms",
]
RSS_PAIR = re.compile(r"^[\d,]+\.\d / [\d,]+\.\d")
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")
BUSY = re.compile(r"^(\d{1,3} / ){3}\d{1,3} %$")
SHARES = re.compile(r"^([\d,]+ / ){3}[\d,]+ %$")


def _cells(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(f"| {label} "):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_help_names_the_scenarios_and_the_packages() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
    ).stdout
    out = " ".join(out.split())  # argparse wraps the description
    assert "--seconds" in out
    assert "apt-get install squid nginx-light wrk hey curl gcc" in out


@pytest.mark.timeout(150)
def test_tiny_run_gives_numbers_for_every_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    affinity = os.sched_getaffinity(0)
    out = tmp_path / "results.md"
    code = main(
        [
            "--seconds=1",
            "--latency-seconds=1",
            "--warmup-seconds=0",
            "--idle-seconds=0.2",
            "--connections=4",
            "--big-mb=1",
            "--idle-connections=100",
            "--rules=1000",
            "--allowlist-edits=2",
            f"--out={out}",
            f"--json={tmp_path / 'results.json'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    table = out.read_text()
    for label in LABELS:
        _, _, squid, ours, ratio = _cells(table, label)
        assert NUMBER.match(squid), (label, squid)
        assert NUMBER.match(ours), (label, ours)
        if "latency" not in label and "CPU-s" not in label:
            # added latency may be ~0 for Squid; CPU time comes in 10 ms ticks
            assert float(squid.replace(",", "")) > 0, (label, squid)
            assert float(ours.replace(",", "")) > 0, (label, ours)
            assert ratio.endswith("x"), (label, ratio)
    assert _cells(table, "errors (non-2xx, socket)")[2:4] == ["0", "0"]
    # the load generators' core, read from /proc/stat per scenario where the run pins it
    busy = _cells(
        table, "load generators' core busy, loaded in turn: HTTP / new tunnels / long-lived / 1 MB"
    )
    pinned = len(affinity) > 1
    for cell in busy[2:4]:
        assert BUSY.match(cell) if pinned else cell == "n/a (not pinned)", busy
    # the proxy's own share of its core, from its CPU time: read pinned or not
    own = _cells(
        table,
        "the proxy's own CPU, share of its core, loaded in turn: HTTP / new tunnels / long-lived "
        "/ 1 MB",
    )
    for cell in own[2:4]:  # over 100 % when a 1 MB download's CPU ticks outlast its seconds
        assert SHARES.match(cell), own
    for label in SIDECAR_LABELS:
        _, ours, reference, ratio = _cells(table, label)
        assert NUMBER.match(ours), (label, ours)
        assert NUMBER.match(reference.split(" (")[0]), (label, reference)
        assert ratio.endswith("x"), (label, ratio)
    spans, of = _cells(table, "spans received by the OTLP receiver")[1].split(" of ")
    assert int(spans.replace(",", "")) > 0, spans  # export happened
    assert of.endswith(" requests"), of
    for label in ("span export on", "transparent", "1,000-rule allowlist", "DNS"):
        assert RSS_PAIR.match(_cells(table, f"RSS idle / peak, MiB, {label}")[1]), label
    edited = _cells(table, "RSS after 2 edits / peak, MiB, 1,000-rule allowlist ↓")
    assert RSS_PAIR.match(edited[1]) and edited[2].endswith(" (before)"), edited
    figures = json.loads((tmp_path / "results.json").read_text())
    assert {row["scenario"] for row in figures["table"]} >= set(LABELS)
    assert len(figures["sidecar_scenarios"]) == len(SIDECAR_LABELS) + 6  # spans, 5 RSS rows
    assert figures["run"]["sidecar"]["idle"]["held"] == 100
    assert figures["run"]["export"]["spans"] > 0
    assert figures["run"]["transparent"]["decisions"] > 0
    assert not any("not measured" in n for n in figures["run"]["notes"])
    assert os.sched_getaffinity(0) == affinity  # the run gave pytest its CPUs back
