"""A CONNECT request head, read strictly. Pure: bytes in, a request or a refusal out.

The fast path reads the explicit listener's first request head itself only when it is a CONNECT
(everything else goes to the plain-HTTP reader). Whatever mitmproxy (the reference engine)
refuses is refused here with the same reason; some heads it accepts are refused here too, since
the fast path never relays what it does not fully understand: folded header lines (obs-fold),
bare LF line endings, whitespace other than one SP in the request line, an HTTP version other
than 1.0 or 1.1, a body (Content-Length other than 0, Transfer-Encoding), a second Host.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from sidecar.memo import remember
from sidecar.policy.model import Reason
from sidecar.policy.target import InvalidTarget, parse_authority

CONNECT = b"CONNECT"

# mitmproxy's reading of an authority (mitmproxy.net.http.url): host, optional decimal port.
_AUTHORITY_RE = re.compile(r"(?P<host>[^:]+|\[.+\])(?::(?P<port>\d+))?")
_LABEL_RE = re.compile(rb"[A-Z\d\-_]{1,63}", re.IGNORECASE)
_VERSION_RE = re.compile(rb"HTTP/1\.[01]")
# RFC 9110 5.1 and 5.5: a field name is a token; a value holds no control character but HTAB.
_FIELD_RE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str  # as the reference engine reads it: IDNA-decoded, without brackets
    port: int
    authority: str  # the request-target as sent
    http_version: str  # "HTTP/1.0" or "HTTP/1.1"


class HeadError(ValueError):
    """The head is refused (400): ``reason`` and ``detail`` go into its decision record."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_connect(head: bytes | bytearray) -> bool:
    """Whether a request head (leading empty lines allowed) is a CONNECT: the method is
    case-sensitive (RFC 9110 9.1), so ``connect`` is some other method."""
    line = bytes(head[: len(CONNECT) + 64]).lstrip(b"\r\n")
    return line.startswith(CONNECT) and line[len(CONNECT) : len(CONNECT) + 1] in (b" ", b"\t")


# Heads read before, by their bytes: a client sends the same CONNECT head for the same
# destination again and again (curl's, a JVM's, a Go client's do not vary), and reading one costs
# as much as the tunnel's decision. Only short heads are kept, and only ones that were accepted.
_READ: dict[bytes, ConnectRequest] = {}
_READ_LIMIT = 1024
_READ_MAX_HEAD = 1024


def parse_connect_head(head: bytes) -> ConnectRequest:
    """Read ``head`` (the request line to the blank line included, leading empty lines
    allowed); raises HeadError."""
    request = _READ.get(head)
    if request is None:
        request = _parse_connect_head(head)
        if len(head) <= _READ_MAX_HEAD:
            remember(_READ, head, request, _READ_LIMIT)
    return request


def _parse_connect_head(head: bytes) -> ConnectRequest:
    body = head.lstrip(b"\r\n")
    if not body.endswith(b"\r\n\r\n"):
        raise HeadError(Reason.INVALID_REQUEST, "a request head must end with CRLF CRLF")
    lines = body[:-4].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise HeadError(Reason.INVALID_REQUEST, "a line ends with a bare LF or CR")
    line = lines[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != CONNECT or not _VERSION_RE.fullmatch(parts[2]):
        raise HeadError(Reason.INVALID_REQUEST, f"Bad HTTP request line: {line!r}")
    host, port = _reference_authority(parts[1], line)
    authority = parts[1].decode("ascii")
    host_fields: list[bytes] = []
    for field_line in lines[1:]:
        match = _FIELD_RE.fullmatch(field_line)
        if match is None:
            raise HeadError(Reason.INVALID_REQUEST, f"Invalid header line: {field_line!r}")
        name, value = match.group(1).lower(), match.group(2)
        if name == b"host":
            host_fields.append(value)
        elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            raise HeadError(Reason.INVALID_REQUEST, "a CONNECT request carries no content")
    if len(host_fields) > 1:
        raise HeadError(Reason.INVALID_REQUEST, "more than one Host header field")
    try:
        # Read again as `check` reads it (as the reference engine does after its own reading).
        parse_authority(authority)
        if host_fields and host_fields[0]:  # an empty Host names nothing (the reference's reading)
            parse_authority(host_fields[0].decode("latin-1"))
    except InvalidTarget as err:
        raise HeadError(Reason.INVALID_DESTINATION, err.reason) from None
    return ConnectRequest(host, port, authority, parts[2].decode("ascii"))


def _reference_authority(raw: bytes, line: bytes) -> tuple[str, int]:
    """Host and port as mitmproxy reads a CONNECT target (the record's host is this host, for
    both engines to write the same decision line); its refusals are "Bad HTTP request line"."""
    read = _read_authority(raw)
    if read is None:
        raise HeadError(Reason.INVALID_REQUEST, f"Bad HTTP request line: {line!r}")
    return read


@functools.lru_cache(maxsize=1024)  # an app dials the same few targets over and over
def _read_authority(raw: bytes) -> tuple[str, int] | None:
    try:
        text = raw.decode("ascii")
        match = _AUTHORITY_RE.fullmatch(text)
        if match is None or not match["port"]:
            return None
        host = match["host"].encode("ascii").decode("idna")
        port = int(match["port"])
    except (UnicodeError, ValueError):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not 0 < port <= 65535 or not _valid_host(host):
        return None
    return host, port


def _valid_host(host: str) -> bool:
    """mitmproxy's is_valid_host: DNS labels (underscore allowed) or an IP address."""
    try:
        encoded = host.encode("idna")
        encoded.decode("idna")
    except UnicodeError:
        return False
    if len(encoded) > 255:
        return False
    labels = encoded[:-1] if encoded.endswith(b".") else encoded
    if all(_LABEL_RE.fullmatch(label) for label in labels.split(b".")):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
