"""The request-head scanner (sidecar.proxy.headlimits): limits, chunking, a reference model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.model import Reason
from sidecar.proxy.headlimits import HeadLimits, HeadRejection, HeadScanner, request_line_start

SMALL = HeadLimits(request_line=40, field_line=30, head=150, fields=5, timeout=1.0)


def scan_in_chunks(
    data: bytes, cuts: list[int], limits: HeadLimits = SMALL
) -> tuple[HeadRejection | None, bool]:
    """Feed ``data`` as a growing buffer, cut at ``cuts``; the first rejection and completeness."""
    scanner = HeadScanner(limits)
    buffer = bytearray()
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        buffer += data[previous:cut]
        previous = cut
        rejection = scanner.scan(buffer)
        if rejection is not None:
            return rejection, scanner.complete
    return None, scanner.complete


def reference(data: bytes, limits: HeadLimits = SMALL) -> tuple[int | None, bool]:
    """The limits restated over a whole buffer: the status of the first limit crossed."""
    body = data.lstrip(b"\r\n")
    offset = 0
    lines = 0
    first = True
    while True:
        newline = body.find(b"\n", offset)
        end = len(body) if newline < 0 else newline
        content = body[offset:end]
        if newline >= 0 and content.endswith(b"\r"):
            content = content[:-1]
        limit = limits.request_line if first else limits.field_line
        # an unfinished line may end in the CR of its CRLF
        if len(content) > limit + (1 if newline < 0 else 0):
            return (414 if first else 431), False
        consumed = len(body) if newline < 0 else newline + 1
        if consumed > limits.head:
            return 431, False
        if newline < 0:
            return None, False
        if not content and not first:
            return None, True
        if not first:
            lines += 1
            if lines > limits.fields:
                return 431, False
        first = False
        offset = newline + 1


@pytest.mark.parametrize(
    ("data", "status", "reason", "detail"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None, None, None),
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", None, None, None),  # leading empty lines
        (b"GET /" + b"a" * 40 + b" HTTP/1.1\r\n", 414, Reason.REQUEST_LINE_TOO_LONG, "40 bytes"),
        (b"GET /" + b"a" * 60, 414, Reason.REQUEST_LINE_TOO_LONG, None),  # never ends
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 40 + b"\r\n\r\n", 431, Reason.HEAD_TOO_LARGE, "field"),
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 60, 431, Reason.HEAD_TOO_LARGE, "field line"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(6)) + b"\r\n",
            431,
            Reason.HEAD_TOO_LARGE,
            "more than 5 header fields",
        ),
        (
            b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 20 + b"\r\n" + b"\r\n" * 0,
            None,
            None,
            None,
        ),
        (
            b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 25 + b"\r\n" + b"Y: " + b"v" * 25 + b"\r\n"
            b"Z: " + b"v" * 25 + b"\r\n" + b"W: " + b"v" * 25 + b"\r\n" + b"V: " + b"v" * 25,
            431,
            Reason.HEAD_TOO_LARGE,
            "larger than 150 bytes",
        ),
        # exactly at the limits: accepted
        (b"G" * 40 + b"\r\n" + b"X" * 30 + b"\r\n\r\n", None, None, None),
        (b"G" * 40 + b"\r", None, None, None),  # the CR of a CRLF still to come
    ],
    ids=[
        "small",
        "leading-crlf",
        "request-line",
        "request-line-never-ends",
        "field-line",
        "field-line-never-ends",
        "field-count",
        "partial-ok",
        "head-size",
        "at-limits",
        "cr-pending",
    ],
)
def test_limits(data: bytes, status: int | None, reason: Reason | None, detail: str | None) -> None:
    rejection = HeadScanner(SMALL).scan(data)
    if status is None:
        assert rejection is None
        return
    assert rejection is not None
    assert (rejection.status, rejection.reason) == (status, reason)
    if detail:
        assert detail in rejection.detail


def test_a_head_stops_at_its_blank_line() -> None:
    scanner = HeadScanner(SMALL)
    data = b"POST / HTTP/1.1\r\nContent-Length: 500\r\n\r\n" + b"x" * 500
    assert scanner.scan(data) is None
    assert scanner.complete and scanner.started


heads = st.lists(
    st.one_of(
        st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")),
        st.sampled_from(
            [b"", b"\r", b"GET / HTTP/1.1", b"Host: a", b" folded", b"X: " + b"v" * 29]
        ),
    ),
    max_size=12,
).map(
    lambda lines: b"".join(
        line + b"\r\n" if i % 3 else line + b"\n" for i, line in enumerate(lines)
    )
)


@settings(max_examples=400, deadline=None)
@given(heads, st.binary(max_size=40), st.lists(st.integers(0, 700), max_size=8))
def test_chunking_never_changes_the_outcome_and_it_matches_the_reference(
    head: bytes, tail: bytes, cuts: list[int]
) -> None:
    data = head + tail
    cuts = [c for c in cuts if c <= len(data)]
    whole = HeadScanner(SMALL)
    outcome = whole.scan(data)
    chunked, complete = scan_in_chunks(data, cuts)
    assert chunked == outcome
    if outcome is None:
        assert complete == whole.complete
    status, ref_complete = reference(data)
    assert (outcome.status if outcome else None) == status
    if outcome is None:
        assert whole.complete == ref_complete


def test_one_byte_at_a_time_is_linear() -> None:
    """Each byte is looked at once: a long field line fed byte by byte is scanned once in total."""
    limits = HeadLimits()
    scanner = HeadScanner(limits)
    buffer = bytearray(b"GET / HTTP/1.1\r\n")
    scanner.scan(buffer)
    for _ in range(16_000):
        buffer += b"a"
        assert scanner.scan(buffer) is None
    assert scanner.scanned == len(buffer)


@pytest.mark.parametrize(
    ("data", "method", "target"),
    [
        (b"GET http://a.test/x HTTP/1.1\r\n", "GET", "http://a.test/x"),
        (b"POST /x", "POST", None),  # the target may still grow
        (b"\xff\xfe /x HTTP/1.1\r\n", None, "/x"),
        (b"", None, None),
    ],
)
def test_request_line_start(data: bytes, method: str | None, target: str | None) -> None:
    assert request_line_start(data) == (method, target)


@given(st.binary(max_size=300))
def test_request_line_start_never_raises(data: bytes) -> None:
    request_line_start(data)


@pytest.mark.parametrize(
    "kwargs", [{"request_line": 0}, {"fields": 0}, {"head": -1}, {"timeout": 0.0}]
)
def test_limits_must_be_positive(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="head limit"):
        HeadLimits(**kwargs)  # type: ignore[arg-type]


MEDIUM = HeadLimits(request_line=200, field_line=120, head=300, fields=6, timeout=1.0)

# Heads as clients send them (CRLF lines ending in a blank one), some with a bare LF or CR.
crlf_heads = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=9
).map(lambda lines: b"\r\n".join(lines) + b"\r\n\r\n")


@settings(max_examples=600, deadline=None)
@given(
    heads | crlf_heads,
    st.binary(max_size=40),
    st.sampled_from([SMALL, MEDIUM, HeadLimits()]),
)
def test_a_head_read_whole_is_read_as_line_by_line(
    head: bytes, tail: bytes, limits: HeadLimits
) -> None:
    """A head whole in the first bytes scanned takes the searches' shortcut (HeadScanner._whole);
    the same bytes scanned from their second byte on take the line loop: same outcome, same
    place, same field count against the reference."""
    data = head + tail
    quick = HeadScanner(limits)
    outcome = quick.scan(data)
    loop = HeadScanner(limits)
    first = loop.scan(data[:1]) if data else None
    looped = first if first is not None else loop.scan(data)
    assert (outcome, quick.complete, quick.scanned) == (looped, loop.complete, loop.scanned)
    status, complete = reference(data, limits)
    assert ((outcome.status if outcome else None), quick.complete) == (status, complete)


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\nGET /next",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\r\nX: 1\r\n\r\n",  # a blank line before the CRLF one
        b"GET / HTTP/1.1\r\nHost: a\n\nX: 1\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 100 + b"\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n",  # one field over: 431 from the loop
    ],
)
def test_the_usual_heads_with_default_limits_read_alike_whole_or_not(data: bytes) -> None:
    quick = HeadScanner(HeadLimits())
    outcome = quick.scan(data)
    loop = HeadScanner(HeadLimits())
    looped = loop.scan(data[:1]) or loop.scan(data)
    assert (outcome, quick.complete, quick.scanned) == (looped, loop.complete, loop.scanned)
    assert reference(data, HeadLimits()) == (
        (outcome.status if outcome else None),
        quick.complete,
    )
