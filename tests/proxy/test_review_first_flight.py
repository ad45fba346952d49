"""Review of issue 8 items 4-6: first flights the classifier misread.

- A ClientHello behind a leading non-handshake TLS record (a warning alert, a
  change_cipher_spec, ...) was not read as TLS at all: its SNI went undecided (raw TCP by
  address on the transparent port; the CONNECT host in a tunnel). Now such a flight is TLS, and
  unreadable: refused.
- An HTTP request with an extension method (PROPFIND, PURGE, lowercase), with empty lines
  before it, or with tabs between its words was raw TCP on the transparent port, so its Host
  never met the name deny rules on a cidr-allowed address. Now it is HTTP, decided by Host.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.wire.first_flight import (
    MAX_FIRST_FLIGHT,
    MAX_REQUEST_LINE,
    FirstFlight,
    Flight,
    classify,
    classify_tls,
)
from tests.proxy.test_wire_first_flight import HELLO

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ALERT = b"\x15\x03\x01\x00\x02\x01\x5a"  # warning: user_canceled
CCS = b"\x14\x03\x01\x00\x01\x01"
APPDATA = b"\x17\x03\x03\x00\x01\x00"
HEARTBEAT = b"\x18\x03\x01\x00\x03\x01\x00\x00"


@pytest.mark.parametrize("prefix", [ALERT, CCS, APPDATA, HEARTBEAT])
@pytest.mark.parametrize("reader", [classify, classify_tls])
def test_a_clienthello_behind_another_record_is_unreadable(
    prefix: bytes, reader: Callable[[bytes], FirstFlight | None]
) -> None:
    result = reader(prefix + HELLO)
    assert result is not None and result.kind is Flight.UNREADABLE, result
    assert result.tls and result.problem is not None and "non-handshake" in result.problem
    # Part of such a record: wait for it (the caller's time bound applies).
    assert reader(prefix[:4]) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROPFIND /x HTTP/1.1\r\nHost: d.test\r\n", Flight.HTTP),
        (b"PURGE / HTTP/1.1\r\n", Flight.HTTP),
        (b"M-SEARCH * HTTP/1.1\r\n", Flight.HTTP),
        (b"get / HTTP/1.1\r\n", Flight.HTTP),
        (b"GET\t/\tHTTP/1.1\r\n", Flight.HTTP),
        (b"FOO / HTTP/1.0\n", Flight.HTTP),
        (b"\r\nGET / HTTP/1.1\r\n", Flight.HTTP),
        (b"\r\n\r\n\nPOST / HTTP/1.1\r\n", Flight.HTTP),
        (b"\r\nPROPFIND / HTTP/1.1\r\n", Flight.HTTP),
        # Not HTTP: raw TCP as before.
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", Flight.OTHER),
        (b"*1\r\n$4\r\nPING\r\n", Flight.OTHER),  # Redis
        (b"get key\r\n", Flight.OTHER),  # memcached
        (b"SELECT 1\n", Flight.OTHER),
        (b"CONNECT a.test:443 HTTP/1.1\r\n", Flight.OTHER),
        (b"\r\nCONNECT a.test:443 HTTP/1.1\r\n", Flight.OTHER),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Flight.OTHER),
        (b"0\x0c\x02\x01\x01`\x07", Flight.OTHER),  # LDAP bind: a tchar, then binary
        (b"\x00\x00\x00\x08\x04\xd2\x16/", Flight.OTHER),  # PostgreSQL SSLRequest
        (b"AMQP\x00\x00\x09\x01", Flight.OTHER),
        (b"FOO /\x01 HTTP/1.1\r\n", Flight.OTHER),
    ],
)  # fmt: skip
def test_request_lines_of_any_method_are_http(data: bytes, expected: Flight) -> None:
    assert classify(data) == FirstFlight(expected)


@pytest.mark.parametrize(
    "data", [b"\r\n", b"\r\n\r\n", b"\r\nGE", b"PROPFIND", b"PROPFIND /x", b"get / HTTP/1.1"]
)
def test_a_request_line_not_ended_yet_is_waited_for(data: bytes) -> None:
    assert classify(data) is None


def test_waiting_for_a_request_line_is_bounded() -> None:
    assert classify(b"FOO /" + b"a" * MAX_REQUEST_LINE) == FirstFlight(Flight.HTTP)  # 414 there
    flood = classify(b"\r\n" * (MAX_FIRST_FLIGHT // 2 + 1))
    assert flood is not None and flood.kind is Flight.UNREADABLE and not flood.tls


def test_inside_a_tunnel_only_tls_is_read() -> None:
    """No wait for a line there (the CONNECT host decides what is not TLS)."""
    assert classify_tls(b"hello") == FirstFlight(Flight.OTHER)
    assert classify_tls(b"PROPFIND") == FirstFlight(Flight.OTHER)
    assert classify_tls(HELLO) == FirstFlight(Flight.TLS, sni="api.test")
    assert classify_tls(b"") is None


@settings(max_examples=300, deadline=None)
@given(
    method=st.text(alphabet=TCHAR, min_size=1, max_size=20),
    blank=st.sampled_from(["", "\r\n", "\n", "\r\n\r\n"]),
    sep=st.sampled_from([" ", "\t", "  "]),
    target=st.sampled_from(["/", "/a?b", "*", "http://d.test/"]),
)  # fmt: skip
def test_any_token_method_is_http(method: str, blank: str, sep: str, target: str) -> None:
    """Whatever the method token (servers route every method by Host), except CONNECT/PRI."""
    data = f"{blank}{method}{sep}{target}{sep}HTTP/1.1\r\nHost: d.test\r\n\r\n".encode()
    expected = Flight.OTHER if method in ("CONNECT", "PRI") else Flight.HTTP
    assert classify(data) == FirstFlight(expected)
