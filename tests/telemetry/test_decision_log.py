"""The decision line without json.dumps (same bytes as with it) and its batched flushing."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.decision_log import (
    FLUSH_AT_CHARS,
    DecisionLog,
    _iso,
    decision_line,
    decision_line_reference,
)
from sidecar.policy.model import Decision, Reason, Verdict
from sidecar.record import Capture, DecisionRecord
from tests.support.records import decision_record

_record = decision_record


NOW = 1_764_680_000.123456


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"decision": Decision(Verdict.DENY, Reason.NO_MATCH, None)},
        {"decision": Decision(Verdict.DENY, Reason.NO_MATCH, None, 'why "quoted"')},
        {"decision": Decision(Verdict.ALLOW, Reason.MATCHED_ALLOW, "", "")},
        {"host": None, "port": 0},
        {"peer_address": "198.18.0.9", "original_address": "10.0.0.1:443"},
        {"peer_address": None, "original_address": "10.0.0.1:443", "capture": Capture.TRANSPARENT},
        {"peer_address": "", "original_address": "10.0.0.1"},
        {"method": "GET", "url": "http://web.test/ü?q=\u2028\x00\x7f", "status_code": 200},
        {"client_address": "::1", "status_code": 0},
        {"error": "[Errno 111] Connect call failed", "status_code": 502},
        {"error": ""},
        {"host": "\ud800bad", "url": "tab\tnewline\nbackslash\\"},
        {"protocol": "CONNECT", "port": 65535, "tls_passthrough": True},
        {"protocol": "POST", "tls_inspected": True, "error": "x"},
    ],
)
def test_the_line_is_what_json_dumps_wrote(fields: dict[str, object]) -> None:
    rec = _record(**fields)
    assert decision_line(rec, now=NOW) == decision_line_reference(rec, now=NOW)
    json.loads(decision_line(rec, now=NOW))


optional_text = st.none() | st.text()


@settings(max_examples=400, deadline=None)
@given(
    verdict=st.sampled_from(Verdict),
    reason=st.sampled_from(Reason),
    rule=optional_text,
    detail=optional_text,
    capture=st.sampled_from(Capture),
    protocol=st.text(),
    host=optional_text,
    port=st.integers(0, 65535),
    peer=optional_text,
    original=optional_text,
    client=optional_text,
    method=optional_text,
    url=optional_text,
    status=st.none() | st.integers(0, 999),
    error=optional_text,
    source=st.text(),
    version=st.text(),
    mode=st.text(),
    now=st.floats(0, 4e9),
)
def test_any_record_gives_the_same_line(  # noqa: PLR0917
    verdict: Verdict,
    reason: Reason,
    rule: str | None,
    detail: str | None,
    capture: Capture,
    protocol: str,
    host: str | None,
    port: int,
    peer: str | None,
    original: str | None,
    client: str | None,
    method: str | None,
    url: str | None,
    status: int | None,
    error: str | None,
    source: str,
    version: str,
    mode: str,
    now: float,
) -> None:
    rec = DecisionRecord(
        Decision(verdict, reason, rule, detail),
        capture,
        protocol,
        host,
        port,
        source,
        version,
        mode,
        peer_address=peer,
        original_address=original,
        client_address=client,
        method=method,
        url=url,
        status_code=status,
        error=error,
    )
    assert decision_line(rec, now=now) == decision_line_reference(rec, now=now)


def test_the_cached_second_follows_the_clock() -> None:
    # Alternating seconds (and threads logging at other times) never reuse a stale prefix.
    for ts in (NOW, NOW + 1, NOW, NOW + 86_400.999, 0.5):
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
        assert _iso(ts) == expected + f".{int(ts % 1 * 1000):03d}Z"


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_outside_an_event_loop_each_line_goes_out_at_once() -> None:
    stream = CountingStream()
    DecisionLog(stream).write(_record())
    assert stream.getvalue().count("\n") == 1 and stream.flushes == 1


def test_in_an_event_loop_lines_go_out_together_within_20_ms() -> None:
    stream = CountingStream()
    log = DecisionLog(stream)

    async def burst() -> tuple[str, float]:
        for _ in range(100):
            log.write(_record())
        held = stream.getvalue()
        started = time.monotonic()
        while stream.getvalue().count("\n") < 100 and time.monotonic() - started < 2:
            await asyncio.sleep(0.002)
        return held, time.monotonic() - started

    held, took = asyncio.run(burst())
    assert held == ""  # nothing written per line
    assert stream.getvalue().count("\n") == 100
    assert stream.flushes == 1
    assert took < 0.2, took  # ~20 ms, generous for two busy cores


def test_a_full_buffer_goes_out_without_waiting_for_the_timer() -> None:
    stream = CountingStream()
    log = DecisionLog(stream)
    line_len = len(decision_line(_record())) + 1
    lines = FLUSH_AT_CHARS // line_len + 1

    async def burst() -> str:
        for _ in range(lines):
            log.write(_record())
        return stream.getvalue()

    assert asyncio.run(burst()).count("\n") == lines


def test_flush_writes_what_is_pending() -> None:
    stream = CountingStream()
    log = DecisionLog(stream)

    async def one() -> None:
        log.write(_record())

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one())  # the timer is never run: the loop stops first
    finally:
        loop.close()
    assert stream.getvalue() == ""
    log.flush()
    assert stream.getvalue().count("\n") == 1
