"""sidecar.wire.http1: strict request and response heads, and the bounded chunked decoder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.wire.http1 import (
    ChunkedDecoder,
    MessageError,
    RequestLineError,
    chunk,
    parse_request_head,
    parse_response_head,
    response_framing,
    response_head_end,
    serialize_request_head,
)


def test_a_request_head_keeps_field_order_and_casing() -> None:
    head = parse_request_head(
        b"\r\nPOST http://a.test/x?y HTTP/1.1\r\nHost: a.test\r\nX-Two:  v a l \t\r\n"
        b"content-length: 3\r\n\r\n"
    )
    assert (head.method, head.target, head.version) == ("POST", "http://a.test/x?y", "1.1")
    assert head.headers == [(b"Host", b"a.test"), (b"X-Two", b"v a l"), (b"content-length", b"3")]
    assert head.framing.length == 3 and not head.framing.chunked and head.keep_alive
    out = serialize_request_head("POST", "/x?y", "1.1", head.headers)
    assert out == b"POST /x?y HTTP/1.1\r\nHost: a.test\r\nX-Two: v a l\r\ncontent-length: 3\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
        b"GET  / HTTP/1.1\r\n\r\n",  # two spaces
        b"GET / HTTP/2.0\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",  # obs-fold
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_heads_the_fast_path_does_not_fully_understand_are_refused(raw: bytes) -> None:
    with pytest.raises(MessageError):
        parse_request_head(raw)


def test_upgrade_expect_and_keep_alive_are_read() -> None:
    up = parse_request_head(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert up.upgrade
    bare = parse_request_head(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
    assert bare.upgrade  # an Upgrade field alone is enough to hand over
    expect = parse_request_head(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n")
    assert expect.expect == b"100-continue"
    assert not parse_request_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert parse_request_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_request_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive


def test_response_heads_and_their_framing() -> None:
    buf = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    end = response_head_end(buf, 1024)
    head = parse_response_head(buf[:end])
    assert (head.status, head.keep_alive) == (200, True)
    assert response_framing(head, "GET") is not None
    assert response_framing(head, "HEAD") is None
    assert response_head_end(b"HTTP/1.1 200 OK\r\n", 1024) == 0
    with pytest.raises(MessageError):
        response_head_end(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 400, 1024)
    close = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n")
    framing = response_framing(close, "GET")
    assert not close.keep_alive and framing is not None and framing.length is None
    for status in (204, 304, 103):
        assert (
            response_framing(parse_response_head(b"HTTP/1.1 %d X\r\n\r\n" % status), "GET") is None
        )
    with pytest.raises(MessageError):
        parse_response_head(b"HTTP/1.1 2OO OK\r\n\r\n")
    with pytest.raises(MessageError):
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        response_framing(parse_response_head(smuggled), "GET")


def _decode(data: bytes, pieces: list[int]) -> tuple[bytes, int, bool]:
    decoder = ChunkedDecoder(64, 256)
    out: list[bytes] = []
    buf = b""
    used_total = 0
    for size in pieces:
        buf += data[:size]
        data = data[size:]
        used = decoder.feed(buf, out)
        used_total += used
        buf = buf[used:]
        if decoder.done:
            break
    return b"".join(out), used_total, decoder.done


@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    st.lists(st.integers(1, 9), min_size=60, max_size=60),
)
def test_chunked_bodies_decode_whatever_the_reads(body: list[bytes], reads: list[int]) -> None:
    wire = b"".join(chunk(p) for p in body) + b"0\r\nX-Trailer: t\r\n\r\n"
    decoded, used, done = _decode(wire + b"NEXT", reads * 10)
    assert done and decoded == b"".join(body) and used == len(wire)  # stops at the body's end


@pytest.mark.parametrize(
    "wire",
    [
        b"5\nhello\r\n0\r\n\r\n",  # bare LF
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
        b"-5\r\nhello\r\n",
        b"5 ;\r\nhello\r\n" + b"z" * 100,  # chunk line with junk
        b"5;" + b"e" * 100,  # a chunk line longer than its bound
        b"0\r\n" + b"X: y\r\n" * 60,  # a trailer section larger than its bound
        b"0\r\nnot a field\r\n\r\n",
    ],
)
def test_chunked_framing_it_cannot_follow_is_an_error(wire: bytes) -> None:
    with pytest.raises(MessageError):
        _decode(wire, [len(wire)])


@pytest.mark.parametrize(
    "raw",
    [
        b"get / HTTP/1.1\r\n\r\n",
        b"GET\t/\tHTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/2.0\r\n\r\n",
    ],
)
def test_request_lines_outside_the_strict_reading_go_to_the_reference(raw: bytes) -> None:
    with pytest.raises(RequestLineError):
        parse_request_head(raw)
