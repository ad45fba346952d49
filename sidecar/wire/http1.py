"""HTTP/1 messages for the fast path, read strictly. Pure: bytes in, parsed fields or an error out.

The head's end is found by the caller (HeadScanner for requests, ``response_head_end`` for
responses); the head alone is then parsed by llhttp (httptools, never its lenient flags), so a
parser never runs past a message into the next one. Bodies are framed here (Content-Length,
chunked), since llhttp does not say where in a buffer a message ended.

Refused on top of llhttp's strict reading (the fast path never forwards what it does not fully
understand): an HTTP version other than 1.0/1.1, more than one SP between request-line parts, a
second Transfer-Encoding or one other than ``chunked``, Transfer-Encoding on
HTTP/1.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CHUNK_EXT_RE = re.compile(
    rb"(?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:=[^\x00-\x08\x0a-\x1f\x7f]*)?)*"
)
_REQUEST_LINE_RE = re.compile(rb"[A-Z]+ [^ ]+ HTTP/1\.[01]")
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: [^\r\n]*)?")
_OWS = b" \t"
# llhttp's words for the smuggling shapes, in the reference engine's (mitmproxy's validate_headers)
# words: a refusal reads the same whichever engine refused.
_MESSAGES = {
    "Transfer-Encoding can't be present with Content-Length": (
        "message with both transfer-encoding and content-length headers"
    ),
    "Duplicate Content-Length": "multiple content-length headers",
}


class MessageError(ValueError):
    """A message the fast path refuses (a request: 400; a response: 502)."""


class RequestLineError(MessageError):
    """A request line outside the fast path's strict reading (a lowercase or unknown method,
    tabs, bare LF, another version): the reference engine may read it, and decides it."""


# Fields whose values the proxy reads: collected by lowercase name while the head is parsed, so
# nothing walks the whole field list again to find them.
SPECIAL_FIELDS = frozenset(
    {
        b"connection",
        b"content-length",
        b"expect",
        b"host",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"traceparent",
        b"tracestate",
        b"transfer-encoding",
        b"upgrade",
    }
)


class _Fields:
    """httptools' callbacks: the target, the fields in order, the special ones by name."""

    __slots__ = ("complete", "headers", "special", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.special: dict[bytes, list[bytes]] = {}
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp strips the leading whitespace of a value, not the trailing (RFC 9112 5: OWS).
        value = value.rstrip(_OWS)
        self.headers.append((name, value))
        low = name.lower()
        if low in SPECIAL_FIELDS:
            found = self.special.get(low)
            if found is None:
                self.special[low] = [value]
            else:
                found.append(value)

    def on_headers_complete(self) -> None:
        self.complete = True


class _SpecialFields:
    """A response's callbacks: only the fields the proxy reads (the head passes as it came)."""

    __slots__ = ("complete", "special")

    def __init__(self) -> None:
        self.special: dict[bytes, list[bytes]] = {}
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in SPECIAL_FIELDS:
            value = value.rstrip(_OWS)
            found = self.special.get(low)
            if found is None:
                self.special[low] = [value]
            else:
                found.append(value)

    def on_headers_complete(self) -> None:
        self.complete = True


@dataclass(frozen=True, slots=True)
class Framing:
    """How a message's body is delimited."""

    chunked: bool = False
    length: int | None = None  # Content-Length; None with chunked or a close-delimited body


# The framings without a length, shared: most messages have one of these or a length of 0.
CHUNKED = Framing(chunked=True)
UNFRAMED = Framing()  # a request without a body; a close-delimited response
NO_BODY = Framing(length=0)


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: list[tuple[bytes, bytes]]  # as received: name casing and order kept
    special: dict[bytes, list[bytes]]  # SPECIAL_FIELDS' values by lowercase name
    framing: Framing
    keep_alive: bool  # what the client asked for (its version and Connection)
    upgrade: bool  # an Upgrade field: not for the fast path
    expect: bytes | None  # the Expect field's value, lowercased (None: none)
    connection_tokens: frozenset[bytes]  # the Connection field's options, lowercased

    def values(self, name: bytes) -> list[bytes]:
        if name in SPECIAL_FIELDS:
            return self.special.get(name, [])
        return [v for n, v in self.headers if n.lower() == name]

    def first(self, name: bytes) -> str | None:
        found = self.values(name)
        return found[0].decode("latin-1") if found else None


_NO_TOKENS: frozenset[bytes] = frozenset()


def _connection_tokens(special: dict[bytes, list[bytes]]) -> frozenset[bytes]:
    values = special.get(b"connection")
    if values is None:
        return _NO_TOKENS
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


def _framing(special: dict[bytes, list[bytes]], version: str) -> Framing:
    te = special.get(b"transfer-encoding")
    cl = special.get(b"content-length")
    if te and cl:
        raise MessageError("message with both transfer-encoding and content-length headers")
    if te:
        if len(te) > 1:
            raise MessageError("multiple transfer-encoding headers")
        if version != "1.1":
            raise MessageError(f"transfer-encoding on HTTP/{version}")
        if te[0].strip().lower() != b"chunked":
            raise MessageError(f"unsupported transfer-encoding {te[0]!r}")
        return CHUNKED
    if cl:
        if len(cl) > 1 or not cl[0].isdigit() or len(cl[0]) > 18:
            raise MessageError(f"invalid content-length {b', '.join(cl)!r}")
        length = int(cl[0])
        return Framing(length=length) if length else NO_BODY
    return UNFRAMED


def parse_request_head(head: bytes) -> RequestHead:
    """One request head, ending with its blank line (leading empty lines allowed)."""
    head = head.lstrip(b"\r\n")
    line_end = head.find(b"\r\n")
    if line_end < 0 or not _REQUEST_LINE_RE.fullmatch(head, 0, line_end):
        raise RequestLineError(f"invalid request line {head[: max(0, min(line_end, 80))]!r}")
    fields = _Fields()
    parser = httptools.HttpRequestParser(fields)
    upgrade = False
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        upgrade = True  # CONNECT, or Connection: upgrade with Upgrade: read, then refused
    except httptools.HttpParserInvalidMethodError as err:
        raise RequestLineError(str(err)) from None
    except httptools.HttpParserError as err:
        message = str(err) or type(err).__name__
        raise MessageError(_MESSAGES.get(message, message)) from None
    if not fields.complete:
        raise MessageError("incomplete request head")
    method = parser.get_method().decode("ascii")
    version = parser.get_http_version()
    special = fields.special
    tokens = _connection_tokens(special)
    keep_alive = (
        b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens
    ) and method != "CONNECT"
    expects = special.get(b"expect")
    return RequestHead(
        method=method,
        target=fields.url.decode("latin-1"),
        version=version,
        headers=fields.headers,
        special=special,
        framing=_framing(special, version),
        keep_alive=keep_alive,
        upgrade=upgrade or b"upgrade" in special,
        expect=b", ".join(v.strip().lower() for v in expects) if expects else None,
        connection_tokens=tokens,
    )


def serialize_request_head(
    method: str, target: str, version: str, headers: list[tuple[bytes, bytes]]
) -> bytes:
    parts = [f"{method} {target} HTTP/{version}\r\n".encode("latin-1")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# -- responses ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponseHead:
    status: int
    version: str
    special: dict[bytes, list[bytes]]  # SPECIAL_FIELDS' values by lowercase name
    keep_alive: bool  # the server keeps the connection open after this response
    connection_tokens: frozenset[bytes]


def response_head_end(buf: bytes | bytearray, limit: int) -> int:
    """Where a response head ends in ``buf`` (the offset after its blank line), 0 if not yet;
    raises MessageError beyond ``limit`` bytes."""
    end = buf.find(b"\r\n\r\n", 0, limit + 4)
    if end >= 0:
        return end + 4
    if len(buf) > limit:
        raise MessageError(f"response head larger than {limit} bytes")
    return 0


def parse_response_head(head: bytes) -> ResponseHead:
    line_end = head.find(b"\r\n")
    if line_end < 0 or not _STATUS_LINE_RE.fullmatch(head, 0, line_end):
        raise MessageError(f"invalid status line {head[: max(0, min(line_end, 80))]!r}")
    fields = _SpecialFields()
    parser = httptools.HttpResponseParser(fields)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # a 101: refused by the caller (the fast path never asks for an upgrade)
    except httptools.HttpParserError as err:
        raise MessageError(str(err) or type(err).__name__) from None
    if not fields.complete:
        raise MessageError("incomplete response head")
    version = parser.get_http_version()
    tokens = _connection_tokens(fields.special)
    keep_alive = b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens
    return ResponseHead(parser.get_status_code(), version, fields.special, keep_alive, tokens)


def response_framing(head: ResponseHead, request_method: str) -> Framing | None:
    """The response body's framing (RFC 9112 6.3); None: no body at all."""
    if request_method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return None
    return _framing(head.special, head.version)


# -- chunked bodies -----------------------------------------------------------------------------


class ChunkedDecoder:
    """A chunked body, decoded strictly and bounded: a chunk-size line (extensions included)
    longer than ``line_limit`` or a trailer section larger than ``trailer_limit`` is an error.
    Trailer fields are read and dropped (RFC 9110 6.5.1: nothing in them is decided)."""

    __slots__ = ("_left", "_line_limit", "_state", "_trailer", "_trailer_limit", "done")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, line_limit: int, trailer_limit: int) -> None:
        self._line_limit = line_limit
        self._trailer_limit = trailer_limit
        self._state = self._SIZE
        self._left = 0
        self._trailer = 0
        self.done = False

    def feed(self, buf: bytes | bytearray, out: list[bytes]) -> int:
        """Decode from ``buf``; data pieces are appended to ``out``; returns the bytes used
        (the rest belongs to what follows the body, or waits for more)."""
        pos = 0
        end = len(buf)
        while pos < end and not self.done:
            if self._state == self._DATA:
                take = min(self._left, end - pos)
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            if self._state == self._DATA_END:
                if end - pos < 2:
                    if buf[pos] != 0x0D:
                        raise MessageError("chunk data not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise MessageError("chunk data not followed by CRLF")
                pos += 2
                self._state = self._SIZE
                continue
            newline = buf.find(b"\n", pos)
            if newline < 0:
                if end - pos > self._line_limit:
                    raise MessageError(f"chunk size line longer than {self._line_limit} bytes")
                break
            if newline == pos or buf[newline - 1] != 0x0D:
                raise MessageError("chunk line not ended by CRLF")
            line = bytes(buf[pos : newline - 1])
            if len(line) > self._line_limit:
                raise MessageError(f"chunk size line longer than {self._line_limit} bytes")
            pos = newline + 1
            if self._state == self._TRAILER:
                self._trailer += len(line) + 2
                if self._trailer > self._trailer_limit:
                    raise MessageError(f"trailer section larger than {self._trailer_limit} bytes")
                if not line:
                    self.done = True
                elif b":" not in line or not _TOKEN_RE.fullmatch(line.split(b":", 1)[0]):
                    raise MessageError("invalid trailer field")
                continue
            size = _HEX_RE.match(line)
            if size is None or not _CHUNK_EXT_RE.fullmatch(line, size.end()):
                raise MessageError(f"invalid chunk size line {line[:40]!r}")
            self._left = int(size.group(), 16)
            self._state = self._DATA if self._left else self._TRAILER
        return pos


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
