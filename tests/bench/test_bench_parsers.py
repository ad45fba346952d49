"""The benchmark's readers of wrk/hey/curl output and /proc, and its table (no processes)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.loadgen import LoadError, LoadResult, parse_curl, parse_hey, parse_tunload, parse_wrk
from bench.procstat import (
    CoreBusy,
    parse_core_ticks,
    parse_cpu_ticks,
    parse_schedstat,
    parse_vmrss_kib,
)
from bench.report import _num, _ratio

HEY_OUTPUT = """
Summary:
  Total:\t5.0031 secs
  Slowest:\t0.0712 secs
  Requests/sec:\t218.2000

Latency distribution:
  10% in 0.0301 secs
  50% in 0.0452 secs
  99% in 0.0650 secs

Status code distribution:
  [200]\t1090 responses
  [403]\t2 responses

Error distribution:
  [3]\tGet "https://127.0.0.1:4443/": proxyconnect tcp: connection reset by peer
  [1]\tGet "https://127.0.0.1:4443/": context deadline exceeded
"""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "BENCH-WRK requests=1000 duration_us=2000000 connect=0 read=0 write=0 status=0 "
            "timeout=0 p50_us=250 p99_us=1200 mean_us=300.5",
            LoadResult(ok=1000, errors=0, seconds=2.0, p50_ms=0.25, p99_ms=1.2),
        ),
        (
            "noise\nBENCH-WRK requests=10 duration_us=1000000 connect=1 read=2 write=0 status=3 "
            "timeout=1 p50_us=1000 p99_us=5000 mean_us=1.0\n",
            LoadResult(ok=7, errors=7, seconds=1.0, p50_ms=1.0, p99_ms=5.0),
        ),
    ],
)
def test_parse_wrk(line: str, expected: LoadResult) -> None:
    assert parse_wrk(line) == expected


def test_parse_wrk_without_marker_line_names_the_output() -> None:
    with pytest.raises(LoadError, match="no BENCH-WRK line"):
        parse_wrk("Running 5s test @ http://127.0.0.1:1/\n")


def test_parse_hey_counts_2xx_as_ok_and_the_rest_as_errors() -> None:
    result = parse_hey(HEY_OUTPUT)
    assert (result.ok, result.errors, result.seconds) == (1090, 6, 5.0031)
    assert result.p50_ms == pytest.approx(45.2)
    assert result.p99_ms == pytest.approx(65.0)
    assert result.rate == pytest.approx(1090 / 5.0031)


def test_parse_hey_without_total_is_an_error() -> None:
    with pytest.raises(LoadError, match="Total"):
        parse_hey("Error: too many open files\n")


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        (
            "BENCH-TUNLOAD ok=120404 status=0 seconds=2.000038 p50_ms=0.255 p99_ms=0.435\n",
            LoadResult(ok=120404, errors=0, seconds=2.000038, p50_ms=0.255, p99_ms=0.435),
        ),
        (  # non-2xx answers are errors; a line among others is found
            "warming\nBENCH-TUNLOAD ok=7 status=3 seconds=1.5 p50_ms=1.005 p99_ms=9.995\n",
            LoadResult(ok=7, errors=3, seconds=1.5, p50_ms=1.005, p99_ms=9.995),
        ),
    ],
)
def test_parse_tunload(stdout: str, expected: LoadResult) -> None:
    assert parse_tunload(stdout) == expected


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("", "no BENCH-TUNLOAD line"),
        ("BENCH-TUNLOAD ok=1 seconds=1 p50_ms=1 p99_ms=1", "unreadable line"),  # no status
        ("BENCH-TUNLOAD ok=x status=0 seconds=1 p50_ms=1 p99_ms=1", "unreadable line"),
        ("BENCH-TUNLOAD ok status=0", "unreadable line"),
    ],
)
def test_parse_tunload_names_what_it_cannot_read(stdout: str, message: str) -> None:
    with pytest.raises(LoadError, match=message):
        parse_tunload(stdout)


@pytest.mark.parametrize(
    ("text", "status", "size", "mb_per_s"),
    [("200 100000000 0.250000", 200, 100_000_000, 400.0), ("403 0 0.01", 403, 0, 0.0)],
)
def test_parse_curl(text: str, status: int, size: int, mb_per_s: float) -> None:
    d = parse_curl(text)
    assert (d.status, d.size) == (status, size)
    assert d.mb_per_s == pytest.approx(mb_per_s)


def test_parse_curl_garbage() -> None:
    with pytest.raises(LoadError):
        parse_curl("curl: (7) Failed to connect")


def test_parse_vmrss() -> None:
    status = "Name:\tsquid\nVmPeak:\t  99999 kB\nVmRSS:\t   31024 kB\nThreads:\t1\n"
    assert parse_vmrss_kib(status) == 31024
    with pytest.raises(ValueError, match="VmRSS"):
        parse_vmrss_kib("Name:\tzombie\nState:\tZ (zombie)\n")


@given(
    comm=st.text(alphabet=st.characters(blacklist_characters="\x00\n"), max_size=15),
    utime=st.integers(0, 10**9),
    stime=st.integers(0, 10**9),
)
def test_parse_cpu_ticks_whatever_the_command_name(comm: str, utime: int, stime: int) -> None:
    # fields 3..13 before utime (14) and stime (15); comm may hold spaces and parentheses
    stat = f"4242 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 1 0"
    assert parse_cpu_ticks(stat) == utime + stime


@pytest.mark.parametrize(
    ("ours", "theirs", "text"),
    [
        (581.0, 11998.0, "0.05x"),
        (17.2, 0.8, "21.50x"),
        (1.0, 0.0, "n/a"),
        (1.0, -0.01, "n/a"),
        (math.nan, 1.0, "n/a"),
    ],
)
def test_ratio(ours: float, theirs: float, text: str) -> None:
    assert _ratio(ours, theirs) == text


def test_num() -> None:
    assert _num(11998.4) == "11,998"
    assert _num(0.2913, 3) == "0.291"
    assert _num(math.nan) == "n/a"


def test_parse_schedstat() -> None:
    assert parse_schedstat("1523000000 870000000 4211\n") == (1_523_000_000, 870_000_000)
    with pytest.raises(ValueError):
        parse_schedstat("garbage")


# /proc/stat as Linux 6.x writes it (user nice system idle iowait irq softirq steal guest
# guest_nice), with a cpu10 so that cpu1's line is not found by a prefix of it.
PROC_STAT = """cpu  9000 10 3000 50000 200 0 300 40 0 0
cpu0 4000 5 1000 30000 100 0 100 20 0 0
cpu1 5000 5 2000 20000 100 0 200 20 500 0
cpu10 1 1 1 1 1 1 1 1 0 0
intr 12345 0 0
ctxt 99
"""


@pytest.mark.parametrize(
    ("cpu", "busy", "total"),
    [
        # busy: all but idle and iowait; guest (already inside user) is not added again
        (0, 4000 + 5 + 1000 + 0 + 100 + 20, 35225),
        (1, 5000 + 5 + 2000 + 0 + 200 + 20, 27325),
        (10, 6, 8),
    ],
)
def test_parse_core_ticks(cpu: int, busy: int, total: int) -> None:
    assert parse_core_ticks(PROC_STAT, cpu) == (busy, total)


@pytest.mark.parametrize(
    ("text", "cpu"),
    [(PROC_STAT, 2), ("cpu0 1 2 3\n", 0), ("", 0)],
)
def test_parse_core_ticks_names_what_is_missing(text: str, cpu: int) -> None:
    with pytest.raises(ValueError, match=f"cpu{cpu} "):
        parse_core_ticks(text, cpu)


def test_core_busy_sums_its_blocks_and_ignores_the_time_between() -> None:
    snapshots = iter(
        [
            "cpu1 100 0 0 900 0 0 0 0\n",  # first block: 50 busy of 100
            "cpu1 150 0 0 950 0 0 0 0\n",
            "cpu1 150 0 0 5000 0 0 0 0\n",  # between blocks: idle, not counted
            "cpu1 250 0 0 5000 0 0 0 0\n",  # second block: 100 busy of 100
        ]
    )
    busy = CoreBusy(1, read=lambda: next(snapshots))
    for _ in range(2):
        with busy:
            pass
    assert (busy.busy, busy.total) == (150, 200)
    assert busy.share == pytest.approx(0.75)


def test_core_busy_without_a_cpu_reads_nothing() -> None:
    def never() -> str:
        raise AssertionError("read")

    busy = CoreBusy(None, read=never)
    with busy:
        pass
    assert math.isnan(busy.share)
