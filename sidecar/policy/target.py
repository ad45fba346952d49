"""Authorities and absolute-form request-targets, read one way for the proxy and for `check`.

An HTTP/1.1 proxy reads ``GET http://host:port/path HTTP/1.1`` by cutting the target at
``://`` and at the first ``/`` after it: everything between is the authority, and it must be a
host name, an IPv4 address or a bracketed IPv6 address, then an optional decimal port. A URL
parser does more: it splits off ``user@``, turns ``\\`` into ``/`` (browsers, WHATWG) or keeps
it in the user part (Python's ``urllib``), ends the authority at ``?`` or ``#``. Each of those is
a second reading of the same bytes, so ``http://evil.test\\@allowed.test/`` was "allowed.test"
to ``urllib`` and "evil.test" to a browser, while the proxy refused it. Here every such
character is refused in the authority: one reading, shared by the proxy's decider and `check`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.policy.errors import InvalidHost, PolicyError, clip
from sidecar.policy.hosts import normalize_host, parse_ip

SCHEMES = ("http", "https")

# Why a character cannot be in an authority: the first one found is named.
_FORBIDDEN = {
    "@": "userinfo (user@host) is not accepted: clients disagree on which host it names",
    "\\": "a backslash is not accepted: browsers read it as '/', other parsers as part of a name",
    "?": "'?' is not accepted before the path: write host[:port]/?query",
    "#": "'#' is not accepted in the authority",
    "%": "percent-encoding is not accepted in a host",
}
_BAD_CHAR_RE = re.compile(r"[\x00-\x20\x7f-\x9f@\\?#%]")
_PORT_RE = re.compile(r"0*[0-9]{1,5}")  # leading zeros, as the proxy reads int()
_PATH_BAD_RE = re.compile(r"[\x00-\x20\x7f]")


class InvalidTarget(PolicyError, ValueError):  # noqa: N818 (reads like InvalidHost)
    """A request-target or authority the proxy would refuse; names the text and why."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"{clip(text)!r} is not a valid target: {reason}")


@dataclass(frozen=True, slots=True)
class Authority:
    host: str  # as written, brackets removed; checked with normalize_host, not normalized
    port: int | None


@dataclass(frozen=True, slots=True)
class Target:
    """An absolute-form request-target: ``scheme://authority/path``."""

    scheme: str  # lowercase, one of SCHEMES
    authority: Authority
    path: str  # from the first "/" after the authority, query included; "/" when none

    @property
    def port(self) -> int:
        return self.authority.port or (443 if self.scheme == "https" else 80)


def _bad_character(text: str, what: str) -> str | None:
    found = _BAD_CHAR_RE.search(text)
    if found is None:
        return None
    char = found.group()
    return _FORBIDDEN.get(char) or f"{what} contains {char!r} (whitespace or a control character)"


def _port(text: str, whole: str) -> int:
    if not _PORT_RE.fullmatch(text):
        what = "an empty port" if not text else f"port {clip(text, 20)!r}"
        raise InvalidTarget(whole, f"{what} is not a number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidTarget(whole, f"port {port} is out of range 1..65535")
    return port


def parse_authority(text: str) -> Authority:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; raises InvalidTarget otherwise."""
    if not text:
        raise InvalidTarget(text, "no host")
    bad = _bad_character(text, "the authority")
    if bad is not None:
        raise InvalidTarget(text, bad)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidTarget(text, "'[' without a closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        address = parse_ip(f"[{host}]")
        if address is None or address.version != 6 or "%" in host:
            raise InvalidTarget(text, "brackets must enclose an IPv6 address")
        if not rest:
            return Authority(host, None)
        if not rest.startswith(":"):
            raise InvalidTarget(text, f"unexpected {clip(rest, 20)!r} after ']'")
        return Authority(host, _port(rest[1:], text))
    if text.count(":") > 1:
        raise InvalidTarget(text, "an IPv6 address needs brackets: [v6] or [v6]:port")
    host, colon, port_text = text.partition(":")
    if not host:
        raise InvalidTarget(text, "no host")
    if host.endswith("]"):
        raise InvalidTarget(text, "']' without an opening '['")
    try:
        normalize_host(host)
    except InvalidHost as err:
        raise InvalidTarget(text, err.reason) from None
    return Authority(host, _port(port_text, text) if colon else None)


def parse_request_target(text: str) -> Target:
    """An absolute-form ``http://`` or ``https://`` target, cut as the proxy cuts it."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise InvalidTarget(text, "not an absolute URL (http://host[:port]/path)")
    if scheme.lower() not in SCHEMES:
        raise InvalidTarget(text, "only http:// and https:// targets")
    authority_text, _, path = rest.partition("/")
    authority = parse_authority(authority_text)
    path = "/" + path
    bad = _PATH_BAD_RE.search(path)
    if bad is not None:
        # A request line cannot carry whitespace in its target; control characters neither.
        raise InvalidTarget(text, f"the path contains {bad.group()!r}")
    return Target(scheme.lower(), authority, path)
