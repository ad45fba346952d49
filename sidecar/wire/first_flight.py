"""What a client's first bytes reveal: a TLS ClientHello (and its SNI), an HTTP/1 request, or
something else. Pure: bytes in, a classification out; the caller bounds how long it waits.

A first flight that looks like TLS is read to the end of its ClientHello, across as many TLS
records and TCP segments as it takes, up to ``MAX_CLIENT_HELLO`` bytes. Whatever looks like TLS
but cannot be read (malformed, too large, an SNI extension that is not one valid host name or
address, optionally with a port) is
``UNREADABLE``: a server or CDN might still read a name from it that the policy never saw, so the
caller refuses it rather than deciding it as nameless TLS.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from enum import StrEnum

from sidecar.policy.errors import InvalidHost
from sidecar.policy.hosts import normalize_host, parse_ip

# TLS 1.3 (RFC 8446 5.1): a record fragment is at most 2^14 bytes. A ClientHello with a
# post-quantum key share is ~1.8 KB; 16 KiB leaves ample room and bounds what is buffered.
MAX_RECORD = 2**14
MAX_CLIENT_HELLO = 2**14
# Record headers on top: a ClientHello split into many tiny records must not grow unbounded.
MAX_FIRST_FLIGHT = MAX_CLIENT_HELLO + 1024

_HANDSHAKE = 0x16
# TLS record content types (RFC 8446 B.1, RFC 6520): change_cipher_spec, alert, handshake,
# application_data, heartbeat. A first flight that opens with any of them is TLS: a record
# other than a handshake before the ClientHello hides the SNI from a reader that only looks at
# flights starting with a handshake record, while a lenient server (one that skips a warning
# alert, as some do before the handshake) still reads the ClientHello after it.
_RECORD_TYPES = frozenset(range(0x14, 0x19))
_CLIENT_HELLO = 0x01
_SNI_EXTENSION = 0x0000
_ALPN_EXTENSION = 0x0010
_HOST_NAME = 0x00

# RFC 9110 5.6.2: the characters of a token, which is what a method is.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Regular expressions, not byte loops: the caller classifies the buffer again on every arrival,
# and a client dribbling a long line one byte at a time would otherwise cost seconds of CPU.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Controls other than the whitespace a request line may hold (_WHITESPACE), and DEL.
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0a\x0e-\x1f\x7f]")
# A ClientHello in more records than this is not one a real client sends (they use one or two);
# bounding the count bounds the work of re-reading the buffer on every arrival.
MAX_RECORDS = 64
# RFC 9112 3: a server may split a request line on any whitespace, not only SP (mitmproxy does).
_WHITESPACE = b" \t\x0b\x0c\r"
# A request line longer than this is HTTP enough: the HTTP layer refuses it (414).
MAX_REQUEST_LINE = 8 * 1024
# Not decided as HTTP whatever their line says: a CONNECT on the transparent port is a
# conversation with some other proxy at the dialled address, and "PRI * HTTP/2.0" opens HTTP/2
# with prior knowledge; both are raw TCP, decided on that address by cidr rules.
_NOT_HTTP_METHODS = (b"CONNECT", b"PRI")

HTTP_METHODS = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
)
# CONNECT is not among them: on the transparent port it is a conversation with some other proxy
# at the dialled address, so it is raw TCP, decided on that address by cidr rules.


class Flight(StrEnum):
    TLS = "tls"
    HTTP = "http"
    OTHER = "other"  # neither: raw TCP
    UNREADABLE = "unreadable"  # looks like TLS, but no ClientHello can be read from it


@dataclass(frozen=True, slots=True)
class FirstFlight:
    kind: Flight
    sni: str | None = None  # TLS: the server name as sent (ASCII), None when there is none
    problem: str | None = None  # UNREADABLE: why
    tls: bool = True  # UNREADABLE: it looked like TLS (False: a partial HTTP request line)


def http_prefix(data: bytes) -> bool | None:
    """True: HTTP/1 request line; False: not HTTP; None: too short to tell."""
    for method in HTTP_METHODS:
        if data.startswith(method):
            return True
        if method.startswith(data):
            return None
    return False


def _request_line(data: bytes) -> bool | None:
    """True: an HTTP/1 request line of any method (a token, whitespace, a target, whitespace,
    ``HTTP/...``); False: not one; None: maybe one, its line not ended yet.

    Servers serve extension methods (PROPFIND, PURGE, lowercase ones) and route them by Host as
    any other: were such a request relayed as raw TCP, its Host would never be decided.
    """
    end = data.find(b"\n")
    line = data[:end] if end >= 0 else data[: MAX_REQUEST_LINE + 1]
    if line.endswith(b"\r"):
        line = line[:-1]
    words = line.split()
    method = words[0] if words and line[0] in _TCHAR else b""
    if not method or not _TOKEN_RE.fullmatch(method) or method in _NOT_HTTP_METHODS:
        return False
    after = line[len(method) : len(method) + 1]
    if after and after not in _WHITESPACE:
        return False  # the method is not a token followed by whitespace
    if _CONTROL_RE.search(line):
        return False  # a control character: no request line holds one
    if end >= 0:
        return len(words) >= 2 and words[-1].startswith(b"HTTP/")
    # An unfinished line: HTTP once past the request-line limit (the HTTP layer answers 414).
    return True if len(line) > MAX_REQUEST_LINE else None


def looks_like_tls(data: bytes) -> bool:
    """Opens with a TLS record type: read as TLS (or refused as unreadable TLS)."""
    return bool(data) and data[0] in _RECORD_TYPES


def _unreadable(problem: str) -> FirstFlight:
    return FirstFlight(Flight.UNREADABLE, problem=problem)


def classify(data: bytes) -> FirstFlight | None:
    """Classify a client's first bytes; None when more bytes are needed to tell."""
    if not data:
        return None
    if looks_like_tls(data):
        return _classify_tls(data)
    # Empty lines before a request line are skipped by servers (RFC 9112 2.2): so here.
    request = data.lstrip(b"\r\n")
    is_http = http_prefix(request) if request else None
    if is_http is False:
        is_http = _request_line(request)
    if is_http is None:
        if len(data) > MAX_FIRST_FLIGHT:
            problem = f"no complete request line in {len(data)} bytes"
            return FirstFlight(Flight.UNREADABLE, problem=problem, tls=False)
        return None
    return FirstFlight(Flight.HTTP if is_http else Flight.OTHER)


def classify_tls(data: bytes) -> FirstFlight | None:
    """Inside a CONNECT tunnel only a ClientHello is read (its SNI must name the CONNECT host);
    anything else is OTHER at once, whatever it is. None: more bytes needed."""
    if not data:
        return None
    if looks_like_tls(data):
        return _classify_tls(data)
    return FirstFlight(Flight.OTHER)


def _looks_like_record(header: bytes) -> bool | None:
    """A TLS handshake record header (SSL 3.0 to TLS 1.3 legacy versions)? None: too short."""
    if len(header) >= 2 and header[1] != 0x03:
        return False
    if len(header) >= 3 and header[2] > 0x03:
        return False
    return True if len(header) >= 3 else None


def _classify_tls(data: bytes) -> FirstFlight | None:
    looks = _looks_like_record(data[:3])
    if looks is None:
        return None  # b"\x16" or b"\x16\x03": maybe TLS, keep reading
    if not looks:
        return FirstFlight(Flight.OTHER)
    # The usual case first: one handshake record holding the whole ClientHello (what the loop
    # below would find, without gathering the record's fragment into a buffer).
    if len(data) >= 9 and data[0] == _HANDSHAKE and data[5] == _CLIENT_HELLO:
        length = (data[3] << 8) | data[4]
        size = 4 + int.from_bytes(data[6:9], "big")
        if 0 < length <= MAX_RECORD and size <= length and len(data) >= 5 + length:
            return _parse_hello(data[9 : 5 + size])
    handshake = bytearray()
    offset = 0
    count = 0
    while len(header := data[offset : offset + 5]) == 5:
        count += 1
        if count > MAX_RECORDS:
            return _unreadable(f"more than {MAX_RECORDS} records before the ClientHello ended")
        if header[0] != _HANDSHAKE or not _looks_like_record(header):
            return _unreadable("a non-handshake record before the ClientHello ended")
        (length,) = struct.unpack("!H", header[3:5])
        if not 0 < length <= MAX_RECORD:
            return _unreadable(f"a TLS record of {length} bytes")
        fragment = data[offset + 5 : offset + 5 + length]
        handshake += fragment
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                return _unreadable(f"handshake message type {handshake[0]} is not a ClientHello")
            size = 4 + int.from_bytes(handshake[1:4], "big")
            if size > MAX_CLIENT_HELLO:
                return _unreadable(f"a ClientHello of {size} bytes (limit {MAX_CLIENT_HELLO})")
            if len(handshake) >= size:
                return _parse_hello(bytes(handshake[4:size]))
        if len(fragment) < length:
            break  # the record is still arriving
        offset += 5 + length
    if len(data) > MAX_FIRST_FLIGHT:
        return _unreadable(f"no complete ClientHello in {len(data)} bytes")
    return None


class EndOfStreamError(EOFError):
    """A ClientHello field runs past the end of the message (kaitaistruct's name for it, which
    the decision records have always carried)."""


def _end(body: bytes, pos: int, size: int) -> int:
    end = pos + size
    if end > len(body):
        raise EndOfStreamError(f"requested {size} bytes, but only {len(body) - pos} available")
    return end


def _short(n: int, pos: int, size: int) -> EndOfStreamError:
    return EndOfStreamError(f"requested {size} bytes, but only {max(0, n - pos)} available")


_EXTENSION_FRAME = struct.Struct("!HH").unpack_from  # an extension's type and length


def server_name_extensions(body: bytes) -> list[list[tuple[int, bytes]]]:
    """The server_name extensions of a ClientHello body (after its 4-byte handshake header):
    for each, its (name type, name) entries. Read as mitmproxy's Kaitai Struct description
    (tls_client_hello.ksy) reads it, field by field, without building an object per field:
    the same messages are read, and the same ones raise EndOfStreamError. Every extension's
    frame is checked; the bodies of server_name and ALPN ones are read to their end.

    Each length is read and bounds-checked inline (a helper call per field was most of this
    function's time)."""
    n = len(body)
    pos = 2 + 32  # legacy version, random
    if pos + 1 > n:
        raise _short(n, pos, 1)
    pos = _end(body, pos + 1, body[pos])  # session id
    if pos + 2 > n:
        raise _short(n, pos, 2)
    pos = _end(body, pos + 2, ((body[pos] << 8) | body[pos + 1]) // 2 * 2)  # cipher suites
    if pos + 1 > n:
        raise _short(n, pos, 1)
    pos = _end(body, pos + 1, body[pos])  # compression methods
    found: list[list[tuple[int, bytes]]] = []
    if pos >= n:
        return found  # no extensions at all
    pos = _end(body, pos, 2)  # the extensions' total length: not relied on, as the .ksy
    while pos < n:
        start = pos + 4
        if start > n:
            raise EndOfStreamError(f"requested 4 bytes, but only {n - pos} available")
        kind, size = _EXTENSION_FRAME(body, pos)
        pos = start + size
        if pos > n:
            raise EndOfStreamError(f"requested {size} bytes, but only {n - start} available")
        if kind == _SNI_EXTENSION:
            found.append(_server_names(body[start:pos]))
        elif kind == _ALPN_EXTENSION:
            ext = body[start:pos]
            at = _end(ext, 0, 2)
            while at < len(ext):
                at = _end(ext, at + 1, ext[at])
    return found


def _server_names(ext: bytes) -> list[tuple[int, bytes]]:
    names = []
    at = _end(ext, 0, 2)  # the list's length: not relied on either
    n = len(ext)
    while at < n:
        if at + 3 > n:
            raise _short(n, at + 1, 2)  # the name's length
        length = (ext[at + 1] << 8) | ext[at + 2]
        end = _end(ext, at + 3, length)
        names.append((ext[at], ext[at + 3 : end]))
        at = end
    return names


def _parse_hello(body: bytes) -> FirstFlight:
    try:
        extensions = server_name_extensions(body)
    except EOFError as exc:
        return _unreadable(f"malformed ClientHello ({type(exc).__name__})")
    if not extensions:
        return _TLS_WITHOUT_SNI
    if len(extensions) > 1:
        return _unreadable("more than one server_name extension")
    server_names = extensions[0]
    if len(server_names) != 1 or server_names[0][0] != _HOST_NAME:
        return _unreadable("a server_name extension that is not exactly one host name")
    raw = server_names[0][1]
    # A host name is at most 253 characters (and a port): longer ones are not worth keeping.
    return _sni_flight(raw) if len(raw) <= _CACHED_SNI else _read_sni_flight(raw)


_TLS_WITHOUT_SNI = FirstFlight(Flight.TLS)
_CACHED_SNI = 300


def _read_sni_flight(raw: bytes) -> FirstFlight:
    """A ClientHello naming ``raw``, or unreadable when that is not a valid host name."""
    sni = _sni(raw)
    if sni is None:
        return _unreadable(f"SNI {raw[:80]!r} is not a valid host name")
    return FirstFlight(Flight.TLS, sni=sni)


# a pod's tunnels name the same few hosts; frozen results, shared by every tunnel naming one
_sni_flight = functools.lru_cache(maxsize=1024)(_read_sni_flight)


def _sni(raw: bytes) -> str | None:
    """The host an SNI names (None: not a valid host name)."""
    try:
        sni = _without_port(raw.decode("ascii"))
        if parse_ip(sni) is None:
            normalize_host(sni)
    except (UnicodeDecodeError, InvalidHost):
        return None
    return sni


def _without_port(sent: str) -> str:
    """The host of an SNI sent as ``host:port`` or ``[v6]:port``.

    RFC 6066 names a bare host (never an address), but real clients send more: Go programs that
    set ServerName from a URL's host (hey, for one) send ``127.0.0.1:8443`` or ``api.test:8443``;
    some JVMs send a literal address. The host part is what a server routes by, so that is what
    is decided (an address is decided as an address, and only a vetted one is ever dialled).
    """
    if sent.startswith("[") and "]" in sent:
        inside, _, rest = sent[1:].partition("]")
        if not rest or (rest.startswith(":") and rest[1:].isdigit()):
            return inside
        return sent
    host, colon, port = sent.rpartition(":")
    if colon and host.count(":") == 0 and port.isdigit() and 0 < int(port) < 65536:
        return host
    return sent
