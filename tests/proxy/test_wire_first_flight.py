"""The pure first-flight classifier: real ClientHellos (written by OpenSSL through Python's ssl),
split across TLS records and segments every way, and arbitrary bytes (hypothesis)."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.wire.first_flight import (
    _CONTROL_RE,
    _TCHAR,
    _TOKEN_RE,
    MAX_CLIENT_HELLO,
    MAX_FIRST_FLIGHT,
    MAX_RECORDS,
    FirstFlight,
    Flight,
    classify,
)


def client_hello(sni: str | None, *, tls13: bool = True) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if not tls13:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_of(record: bytes) -> bytes:
    """The handshake message inside a one-record ClientHello."""
    (length,) = struct.unpack("!H", record[3:5])
    assert len(record) == 5 + length
    return record[5:]


def records(message: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """``message`` re-fragmented into handshake records of the given sizes (the rest last)."""
    out, rest = b"", message
    for size in sizes:
        if not rest:
            break
        chunk, rest = rest[:size], rest[size:]
        out += b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
    if rest:
        out += b"\x16" + version + struct.pack("!H", len(rest)) + rest
    return out


def with_sni_extension(message: bytes, body: bytes, padding: int = 0) -> bytes:
    """``message`` (a ClientHello handshake message) with its SNI extension body replaced, and
    a padding extension (RFC 7685) of ``padding`` bytes when asked."""
    hello = bytearray(message[4:])
    offset = 2 + 32  # version, random
    offset += 1 + hello[offset]  # session id
    offset += 2 + int.from_bytes(hello[offset : offset + 2], "big")  # cipher suites
    offset += 1 + hello[offset]  # compression methods
    ext_start = offset + 2
    others, pos = b"", ext_start
    while pos < len(hello):
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        if kind != 0:
            others += bytes(hello[pos : pos + 4 + size])
        pos += 4 + size
    exts = struct.pack("!HH", 0, len(body)) + body + others
    if padding:
        exts += struct.pack("!HH", 0x0015, padding) + bytes(padding)
    new = bytes(hello[:offset]) + struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(new).to_bytes(3, "big") + new


def sni_body(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in names)
    return struct.pack("!H", len(entries)) + entries


HELLO = client_hello("api.test")
TRUNCATED = b"\x01\x00\x00\x28" + handshake_of(HELLO)[4:44]  # declares 40 bytes, ends early


def sni_flight(*names: tuple[int, bytes]) -> bytes:
    """HELLO with an SNI extension of ``names`` (name type, name)."""
    return records(with_sni_extension(handshake_of(HELLO), sni_body(*names)), [])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (HELLO, FirstFlight(Flight.TLS, sni="api.test")),
        (client_hello("API.Test."), FirstFlight(Flight.TLS, sni="API.Test.")),
        (client_hello("xn--bcher-kva.test"), FirstFlight(Flight.TLS, sni="xn--bcher-kva.test")),
        (client_hello(None), FirstFlight(Flight.TLS)),
        (client_hello("api.test", tls13=False), FirstFlight(Flight.TLS, sni="api.test")),
        (HELLO + b"trailing early data", FirstFlight(Flight.TLS, sni="api.test")),
        (b"GET / HTTP/1.1\r\n", FirstFlight(Flight.HTTP)),
        (b"OPTIONS * HTTP/1.1", FirstFlight(Flight.HTTP)),
        (b"CONNECT a:443 HTTP/1.1", FirstFlight(Flight.OTHER)),
        (b"PRI * HTTP/2.0", FirstFlight(Flight.OTHER)),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", FirstFlight(Flight.OTHER)),
        (b"\x16\x04\x00", FirstFlight(Flight.OTHER)),  # not a TLS record version
        (b"\x16\x03\x04", FirstFlight(Flight.OTHER)),
        (b"\x16\xfe\xfd", FirstFlight(Flight.OTHER)),  # DTLS: not on TCP
        # Too short to tell: wait for more.
        (b"", None),
        (b"\x16", None),
        (b"\x16\x03", None),
        (b"\x16\x03\x01\x02", None),
        (b"G", None),
        (b"POST", None),
    ],
)
def test_classify_table(data: bytes, expected: FirstFlight | None) -> None:
    assert classify(data) == expected


@pytest.mark.parametrize(
    ("sent", "sni"),
    [
        # As real clients send them: Go programs (hey) put the URL's host:port in ServerName,
        # some JVMs a literal address. The host part is what is decided.
        (b"198.51.100.7", "198.51.100.7"),
        (b"127.0.0.1:24555", "127.0.0.1"),
        (b"api.test:8443", "api.test"),
        (b"[2001:db8::1]:443", "2001:db8::1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"2001:db8::1", "2001:db8::1"),
    ],
)
def test_an_sni_with_a_port_or_an_address_is_read_as_its_host(sent: bytes, sni: str) -> None:
    assert classify(sni_flight((0, sent))) == FirstFlight(Flight.TLS, sni=sni)


def test_heys_clienthello_is_read() -> None:
    """A ClientHello captured from hey 0.1.4 (Go) for https://127.0.0.1:24555/."""
    hello = bytes.fromhex(GO_HEY_HELLO)
    assert classify(hello) == FirstFlight(Flight.TLS, sni="127.0.0.1")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x16\x03\x01\x00\x05hello", "not a ClientHello"),
        (b"\x16\x03\x01\x00\x00", "a TLS record of 0 bytes"),
        (b"\x16\x03\x01\x40\x01" + b"\x01", "a TLS record of 16385 bytes"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x40\x00", f"limit {MAX_CLIENT_HELLO}"),
        (records(handshake_of(HELLO), [10])[:15] + b"\x17\x03\x03\x00\x01x", "non-handshake"),
        (records(TRUNCATED, []), "malformed ClientHello"),
        (sni_flight((0, b"a.test"), (0, b"b.test")), "not exactly one host name"),
        (sni_flight((1, b"a.test")), "not exactly one host name"),
        (sni_flight((0, b"a b.test")), "not a valid host name"),
        (sni_flight((0, b"a.test:99999")), "not a valid host name"),
        (sni_flight((0, b"a.test:443:443")), "not a valid host name"),
        (sni_flight((0, b"[::1]x")), "not a valid host name"),
    ],
    ids=lambda v: "flight" if isinstance(v, bytes) else v,  # HELLO is random: stable ids
)  # fmt: skip
def test_what_looks_like_tls_but_cannot_be_read_is_unreadable(data: bytes, problem: str) -> None:
    """A server might read a name from these that the policy never saw: the caller refuses."""
    result = classify(data)
    assert result is not None and result.kind is Flight.UNREADABLE, result
    assert result.problem is not None and problem in result.problem


@pytest.mark.parametrize("padding", [1800, 9000, MAX_CLIENT_HELLO - 1000])
def test_large_clienthellos_across_records_are_reassembled(padding: int) -> None:
    """Post-quantum key shares make ClientHellos of several KB; a padding extension stands in."""
    big = with_sni_extension(handshake_of(HELLO), sni_body((0, b"api.test")), padding)
    assert len(big) <= MAX_CLIENT_HELLO
    for sizes in ([1] * 50, [4096] * 4, [100, 3, 7000], [len(big) - 1]):
        assert classify(records(big, sizes)) == FirstFlight(Flight.TLS, sni="api.test")


def test_a_clienthello_over_the_size_limit_is_unreadable() -> None:
    big = with_sni_extension(handshake_of(HELLO), sni_body((0, b"api.test")), MAX_CLIENT_HELLO)
    result = classify(records(big, [4096] * 5))
    assert result is not None and result.kind is Flight.UNREADABLE


@settings(max_examples=100, deadline=None)
@given(
    sni=st.sampled_from(["api.test", "a.b.c.example", "xn--bcher-kva.test", None]),
    sizes=st.lists(st.integers(1, 600), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_any_record_split_and_any_prefix(sni: str | None, sizes: list[int], cut: int) -> None:
    """However the records are cut, the whole flight yields the SNI, and every proper prefix
    asks for more: the classifier never decides on part of a ClientHello."""
    data = records(handshake_of(client_hello(sni)), sizes)
    assert classify(data) == FirstFlight(Flight.TLS, sni=sni)
    prefix = data[: cut % len(data)]
    assert classify(prefix) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=MAX_FIRST_FLIGHT + 64))
def test_arbitrary_bytes_never_raise_and_waiting_is_bounded(data: bytes) -> None:
    result = classify(data)
    if len(data) > MAX_FIRST_FLIGHT:
        assert result is not None  # past the size bound something is decided
    if result is not None and result.kind is Flight.TLS:
        assert data[0] == 0x16


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600))
def test_arbitrary_handshake_bodies_in_a_record_never_raise(body: bytes) -> None:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    result = classify(records(message, []))
    assert result is not None and result.kind in (Flight.TLS, Flight.UNREADABLE)


def test_a_flight_past_the_size_bound_without_a_complete_hello_is_unreadable() -> None:
    # Declares a 16 KiB ClientHello, delivered in 1-byte records: the record headers alone
    # take it past the buffering bound before the message completes.
    message = b"\x01" + (MAX_CLIENT_HELLO - 4).to_bytes(3, "big") + b"\x00" * 4000
    result = classify(records(message, [1] * 4004))
    assert result is not None and result.kind is Flight.UNREADABLE


# hey 0.1.4 (Go crypto/tls) for https://127.0.0.1:24555/: SNI "127.0.0.1:24555".
GO_HEY_HELLO = (
    "1603010102010000fe0303292d5ab81dd23d3d478e14a24a2e57be60f1279e7501e1d66f9ded5a97b00c3820"
    "25061d465c6bf5871679d0f3471832a590c2db4d3b83342cbe52fccd4b681cce0026c02bc02fc02cc030cca9"
    "cca8c009c013c00ac014009c009d002f0035c012000a1301130213030100008f00000014001200000f313237"
    "2e302e302e313a3234353535000500050100000000000a000a0008001d001700180019000b00020100000d00"
    "1a0018080404030807080508060401050106010503060302010203ff0100010000120000002b000504030403"
    "03003300260024001d0020dd2fc6b0dd7b9ce30517d391793b357e7a5cdde4dbd79c780978294d88c6e231"
)


def test_a_clienthello_in_more_records_than_any_client_uses_is_unreadable() -> None:
    """Each arrival re-reads the buffer: the record count bounds that work (a client dribbling
    one-byte records would otherwise cost seconds of the event loop's CPU)."""
    hello = with_sni_extension(handshake_of(HELLO), sni_body((0, b"api.test")), 0)
    assert classify(records(hello, [1] * (MAX_RECORDS - 1))) == FirstFlight(
        Flight.TLS, sni="api.test"
    )
    result = classify(records(hello, [1] * MAX_RECORDS))
    assert result is not None and result.kind is Flight.UNREADABLE
    assert result.problem is not None and f"more than {MAX_RECORDS} records" in result.problem


@given(st.binary(max_size=40))
def test_the_token_and_control_expressions_are_the_rfc_sets(data: bytes) -> None:
    assert bool(_TOKEN_RE.fullmatch(data)) == (bool(data) and all(c in _TCHAR for c in data))
    controls = any((c < 0x21 and c not in b" \t\x0b\x0c\r") or c == 0x7F for c in data)
    assert bool(_CONTROL_RE.search(data)) == controls
