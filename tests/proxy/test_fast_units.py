"""Pure pieces of the fast path's tunnels and streams: the original destination's sockaddr
parsing (IPv4, IPv6), a connection that was not redirected, the strict CONNECT head reader
against mitmproxy's reading (the reference engine's: both write the same host in a record), and
the ClientHello reader against the Kaitai Struct description it replaced."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.contrib.kaitaistruct.tls_client_hello import TlsClientHello
from mitmproxy.net.http.http1 import read_request_head

from sidecar.fastpath.transparent import (
    Unredirected,
    original_destination,
    sockaddr_in,
    sockaddr_in6,
)
from sidecar.policy.model import Reason
from sidecar.wire.connect_head import HeadError, is_connect, parse_connect_head
from sidecar.wire.first_flight import server_name_extensions
from tests.proxy.test_tunnels_e2e import client_hello

# -- SO_ORIGINAL_DST ------------------------------------------------------------------------------


def test_a_sockaddr_in_is_read_as_the_kernel_writes_it() -> None:
    # struct sockaddr_in: family (host order), port and address (network order), 8 bytes zero.
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s", 443, bytes([198, 18, 0, 7]))
    assert sockaddr_in(raw + bytes(8)) == ("198.18.0.7", 443)


def test_a_sockaddr_in6_is_read_as_the_kernel_writes_it() -> None:
    # struct sockaddr_in6: family, port, flow info, 16-byte address, scope id.
    address = socket.inet_pton(socket.AF_INET6, "fd00::1:2")
    raw = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI16s", 8443, 0x12345, address)
        + struct.pack("=I", 3)
    )
    assert len(raw) == 28
    assert sockaddr_in6(raw) == ("fd00::1:2", 8443)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_connection_that_was_not_redirected_has_no_original_destination(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2], timeout=5):
            accepted, _ = listener.accept()
            with accepted, pytest.raises(OSError):
                original_destination(accepted)


def test_unredirected_connections_are_one_warning_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unredirected = Unredirected(interval=60)
    with caplog.at_level("WARNING", logger="sidecar.fastpath.transparent"):
        assert unredirected.note("[Errno 2] No such file or directory")
        assert not any(unredirected.note("again") for _ in range(5))
    (record,) = caplog.records
    assert "not redirected" in record.getMessage() and record.__dict__["times"] == 1


# -- the CONNECT head ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "api.test:443",
        "API.Test:443",
        "XN--Bcher-KVA.Test.:8443",
        "xn--bcher-kva.test:1",
        "a_b.test:1",
        "api.test:0443",
        "127.0.0.1:80",
        "[::1]:443",
        "[fd00::1]:5432",
    ],
)
def test_the_host_of_a_connect_is_read_as_the_reference_reads_it(target: str) -> None:
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    ours = parse_connect_head(head)
    theirs = read_request_head([f"CONNECT {target} HTTP/1.1".encode(), f"Host: {target}".encode()])
    assert (ours.host, ours.port, ours.authority) == (theirs.host, theirs.port, target)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"CONNECT api.test HTTP/1.1\r\n\r\n", Reason.INVALID_REQUEST),  # no port
        (b"CONNECT api.test:0 HTTP/1.1\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:70000 HTTP/1.1\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT  api.test:443 HTTP/1.1\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443 HTTP/2.0\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT b\xc3\xbccher.test:443 HTTP/1.1\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443 HTTP/1.1\nHost: api.test\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443 HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443 HTTP/1.1\r\nBad Name: x\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443 HTTP/1.1\r\nX: a\x01b\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT api.test:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n", Reason.INVALID_REQUEST),
        (
            b"CONNECT api.test:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            Reason.INVALID_REQUEST,
        ),
        (b"CONNECT api.test:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Reason.INVALID_REQUEST),
        # Read by the reference, refused by `check`'s reading (after it): invalid destination.
        (b"CONNECT u@api.test:443 HTTP/1.1\r\n\r\n", Reason.INVALID_REQUEST),
        (b"CONNECT 1.2.3.4.5:443 HTTP/1.1\r\n\r\n", Reason.INVALID_DESTINATION),
        (b"CONNECT api.test:443 HTTP/1.1\r\nHost: a@b\r\n\r\n", Reason.INVALID_DESTINATION),
    ],
)
def test_a_connect_head_the_fast_path_does_not_fully_understand_is_refused(
    head: bytes, reason: Reason
) -> None:
    with pytest.raises(HeadError) as caught:
        parse_connect_head(head)
    assert caught.value.reason is reason


def test_a_connect_head_may_follow_empty_lines_and_carry_a_zero_length() -> None:
    head = b"\r\n\r\nCONNECT api.test:443 HTTP/1.0\r\nContent-Length: 0\r\nHost:\r\n\r\n"
    request = parse_connect_head(head)
    assert (request.host, request.port, request.http_version) == ("api.test", 443, "HTTP/1.0")


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"CONNECT a:1 HTTP/1.1\r\n\r\n", True),
        (b"\r\nCONNECT a:1 HTTP/1.1\r\n\r\n", True),
        (b"connect a:1 HTTP/1.1\r\n\r\n", False),  # methods are case-sensitive
        (b"CONNECTX a:1 HTTP/1.1\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.1\r\n\r\n", False),
    ],
)
def test_only_the_connect_method_is_a_tunnel(head: bytes, expected: bool) -> None:
    assert is_connect(head) is expected


@settings(max_examples=300, deadline=None)
@given(
    host=st.from_regex(r"[A-Za-z0-9_.\-\[\]:@%]{1,30}", fullmatch=True),
    port=st.integers(min_value=0, max_value=70000),
)
def test_what_the_fast_path_accepts_the_reference_reads_the_same(host: str, port: int) -> None:
    """Never a host the reference would read differently (or refuse) in a record."""
    target = f"{host}:{port}"
    try:
        ours = parse_connect_head(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    except HeadError:
        return
    theirs = read_request_head([f"CONNECT {target} HTTP/1.1".encode()])
    assert (ours.host, ours.port) == (theirs.host, theirs.port)


# -- the ClientHello reader against mitmproxy's Kaitai Struct description (it replaced it) ------


def _kaitai(body: bytes) -> list[list[tuple[int, bytes]]] | str:
    try:
        hello = TlsClientHello.from_bytes(body)
    except (EOFError, ValueError) as exc:
        return type(exc).__name__
    extensions = getattr(hello, "extensions", None)
    return [
        [(n.name_type, n.host_name) for n in ext.body.server_names]
        for ext in (extensions.extensions if extensions else [])
        if ext.type == 0
    ]


def _ours(body: bytes) -> list[list[tuple[int, bytes]]] | str:
    try:
        return server_name_extensions(body)
    except EOFError as exc:
        return type(exc).__name__


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


_names = st.lists(
    st.tuples(st.integers(0, 2), st.binary(max_size=20)).map(
        lambda t: bytes([t[0]]) + struct.pack("!H", len(t[1])) + t[1]
    ),
    max_size=3,
).map(lambda parts: struct.pack("!H", sum(map(len, parts))) + b"".join(parts))
_alpn = st.lists(st.binary(max_size=8).map(lambda p: bytes([len(p)]) + p), max_size=3).map(
    lambda parts: struct.pack("!H", sum(map(len, parts))) + b"".join(parts)
)
_extensions = st.lists(
    st.one_of(
        # Well-formed bodies, and any bytes (lengths that overrun, a body cut mid-entry).
        (_names | st.binary(max_size=12)).map(lambda b: _extension(0, b)),
        (_alpn | st.binary(max_size=12)).map(lambda b: _extension(16, b)),
        st.tuples(st.integers(1, 65535), st.binary(max_size=12)).map(lambda t: _extension(*t)),
    ),
    max_size=4,
)


@settings(max_examples=500, deadline=None)
@given(
    session=st.binary(max_size=32),
    suites=st.binary(max_size=9),  # an odd length too
    extensions=st.none() | _extensions,
    cut=st.integers(min_value=0, max_value=400),
    flip=st.integers(min_value=0, max_value=400),
)
def test_the_clienthello_reader_reads_what_kaitai_reads(
    session: bytes, suites: bytes, extensions: list[bytes] | None, cut: int, flip: int
) -> None:
    """Every message (well-formed, cut short, or with one length byte changed) gives the same
    server names, or the same error, as the Kaitai description the classifier used before."""
    body = b"\x03\x03" + bytes(32) + bytes([len(session)]) + session
    body += struct.pack("!H", len(suites)) + suites + b"\x01\x00"
    if extensions is not None:
        joined = b"".join(extensions)
        body += struct.pack("!H", len(joined)) + joined
    for variant in (body, body[: len(body) - cut % (len(body) + 1)]):
        assert _ours(variant) == _kaitai(variant), variant
    if body:
        mutated = bytearray(body)
        mutated[flip % len(body)] ^= 0x41
        assert _ours(bytes(mutated)) == _kaitai(bytes(mutated)), bytes(mutated)


def test_a_real_clienthello_is_read_alike() -> None:
    for sni in ("api.test", None, "xn--bcher-kva.test"):
        body = _handshake_body(client_hello(sni))
        assert _ours(body) == _kaitai(body)
        assert _ours(body) == ([[(0, sni.encode())]] if sni else [])


def _handshake_body(flight: bytes) -> bytes:
    """A one-record ClientHello's handshake body (after the record and handshake headers)."""
    return flight[5 + 4 :]


# -- a request's target and Host, read once (sidecar.fastpath.http._read_target) --------------

TARGET_CASES = [
    # (request-target, Host, original destination) -> (host, port, path, Host the upstream sees)
    ("http://api.test/x?q=1", "api.test", None, ("api.test", 80, "/x?q=1", None)),
    ("http://api.test:8080/", "api.test:8080", None, ("api.test", 8080, "/", None)),
    ("http://api.test/", "other.test", None, ("api.test", 80, "/", b"api.test")),
    ("http://API.test/", "api.TEST:80", None, ("API.test", 80, "/", None)),  # the same host
    ("http://bücher.test/", None, None, ("bücher.test", 80, "/", b"xn--bcher-kva.test")),
    ("/p", "api.test:81", None, ("api.test", 81, "/p", None)),
    ("/p", "api.test", ("198.18.0.7", 8080), ("api.test", 8080, "/p", None)),  # same host
    ("/p", None, ("198.18.0.7", 80), (None, 80, "/p", None)),  # transparent, by address
]


@pytest.mark.parametrize(("text", "host", "original", "expected"), TARGET_CASES)
def test_a_target_and_its_host_are_read_as_before(
    text: str,
    host: str | None,
    original: tuple[str, int] | None,
    expected: tuple[str | None, int, str, bytes | None],
) -> None:
    from sidecar.fastpath.http import _read_target

    target = _read_target(text, host, original)
    assert (target.host, target.port, target.path, target.aligned_host) == expected


def test_a_target_neither_absolute_nor_origin_form_is_not_read() -> None:
    from sidecar.fastpath.http import _read_target
    from sidecar.wire.http1 import MessageError

    with pytest.raises(MessageError):
        _read_target("*", "api.test", None)
    with pytest.raises(MessageError):
        _read_target("/p", None, None)  # no Host and no original destination


def test_a_connect_head_read_again_is_read_the_same_and_refusals_are_never_kept() -> None:
    from sidecar.wire import connect_head

    head = b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n"
    first = parse_connect_head(head)
    assert parse_connect_head(head) is first  # kept: the same reading
    bad = b"CONNECT api.test:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    for _ in range(2):
        with pytest.raises(HeadError):
            parse_connect_head(bad)
    assert bad not in connect_head._READ
    for n in range(connect_head._READ_LIMIT + 5):
        parse_connect_head(b"CONNECT h%d.test:443 HTTP/1.1\r\n\r\n" % n)
    assert len(connect_head._READ) <= connect_head._READ_LIMIT
