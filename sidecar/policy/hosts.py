"""Host names and addresses as the policy compares them.

One normal form for rules and requests alike: lowercase ASCII, no trailing dot, IDN labels as
punycode (UTS #46 mapping, so fullwidth letters and ideographic full stops fold the way browsers
and curl fold them), IP literals in ``ipaddress``'s compressed form. Numeric host names that a
resolver would read as IPv4 (``127.1``, ``0x7f.0.0.1``, ``2130706433``) are returned as the
address they denote, so a name rule cannot be sidestepped by spelling an address oddly.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

from sidecar.policy.errors import InvalidHost, clip
from sidecar.policy.model import IPAddress

MAX_NAME = 253
MAX_LABEL = 63

# Letters, digits, hyphen; underscore too because real service names (_dmarc, SRV-style,
# some CDN hosts) carry it and refusing them would only push users to wider wildcards.
_LABEL_RE = re.compile(r"[a-z0-9_-]+")
_IP_CHARS_RE = re.compile(r"[0-9a-fA-F.:]+(%|$)")
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGITS_RE = re.compile(r"[0-9]+")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")
_OCT_RE = re.compile(r"[0-7]+")


def parse_ip(host: str) -> IPAddress | None:
    """The address when ``host`` is an IP literal (``[v6]`` brackets allowed), else None."""
    text = host.strip()
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
    if not text or len(text) > 100 or not _IP_CHARS_RE.match(text):
        return None  # cheap early out: most host names are not addresses
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if bracketed and address.version != 6:
        return None
    scope = address.scope_id if isinstance(address, ipaddress.IPv6Address) else None
    if scope is not None and not _SCOPE_RE.fullmatch(scope):
        return None
    return address


def normalize_host(name: str) -> str:
    """The normal form of a host name or IP literal; raises InvalidHost naming ``name``."""
    if isinstance(name, str) and len(name) <= 300:
        return _normalize_cached(name)
    return _normalize(name)


def normalize_host_once(name: str) -> str:
    """``normalize_host`` for a name read once, such as an allowlist rule's host: it stays out
    of the cache, which is for the hosts calls name. Parsing a 10,000-rule allowlist through
    the cache would evict those, and its 4,096 kept keys (strings of the YAML node tree) would
    pin that tree's freed memory: 7 MiB of RSS measured."""
    return _normalize(name)


@functools.lru_cache(maxsize=4096)
def _normalize_cached(name: str) -> str:
    # A proxy sees the same few hosts over and over; the cache is bounded and the function pure.
    return _normalize(name)


def _normalize(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidHost(repr(name), "not a string")
    text = name.strip()
    if not text:
        raise InvalidHost(name, "empty host")
    if len(text) > 4 * MAX_NAME:
        # Before any per-character work (UTS #46 mapping can drop characters, not 3 in 4).
        raise InvalidHost(name, f"longer than {MAX_NAME} characters")
    if text.startswith("[") or text.endswith("]"):
        address = parse_ip(text)
        if address is None or address.version != 6:
            raise InvalidHost(name, "brackets must enclose an IPv6 address")
        return str(address)
    address = parse_ip(text)
    if address is not None:
        return str(address)
    if ":" in text:
        raise InvalidHost(name, "a host name cannot contain ':' (is a port attached?)")
    if not text.isascii():
        text = _map_unicode(name, text)
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise InvalidHost(name, "empty host")
    labels = text.split(".")
    for label in labels:
        if not label:
            raise InvalidHost(name, "empty label (two dots in a row, or a leading dot)")
        if len(label) > MAX_LABEL:
            raise InvalidHost(name, f"label {label[:20]!r}... is longer than {MAX_LABEL}")
        if not _LABEL_RE.fullmatch(label):
            bad = next(c for c in label if not _LABEL_RE.fullmatch(c))
            raise InvalidHost(name, f"character {bad!r} is not allowed in a host name")
    if len(text) > MAX_NAME:
        raise InvalidHost(name, f"longer than {MAX_NAME} characters")
    if _ends_in_number(labels[-1]):
        numeric = _parse_ipv4_number_form(labels)
        if numeric is None:
            raise InvalidHost(name, "ends in a number but is not an IPv4 address")
        return str(numeric)
    return text


def _map_unicode(original: str, text: str) -> str:
    try:
        mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise InvalidHost(original, f"not a valid international name ({clip(exc)})") from None
    labels = mapped.split(".")
    out = []
    for label in labels:
        if label.isascii():
            out.append(label)
            continue
        try:
            out.append(idna.alabel(label).decode("ascii"))
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise InvalidHost(
                original, f"label {clip(label)!r} is not a valid IDN label ({clip(exc)})"
            ) from None
    return ".".join(out)


def _ends_in_number(label: str) -> bool:
    # WHATWG URL "ends in a number": what browsers and libc's inet_aton treat as IPv4.
    if _DIGITS_RE.fullmatch(label):
        return True
    return label[:2] in ("0x", "0X") and bool(_HEX_RE.fullmatch(label[2:]))


def _parse_ipv4_number(part: str) -> int | None:
    if len(part) > 40:
        return None
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        if not _HEX_RE.fullmatch(digits):
            return None
        return int(digits, 16) if digits else 0
    if len(part) > 1 and part[0] == "0":
        return int(part[1:], 8) if _OCT_RE.fullmatch(part[1:]) else None
    return int(part) if _DIGITS_RE.fullmatch(part) else None


def _parse_ipv4_number_form(labels: list[str]) -> ipaddress.IPv4Address | None:
    if len(labels) > 4:
        return None
    numbers = []
    for label in labels:
        number = _parse_ipv4_number(label)
        if number is None:
            return None
        numbers.append(number)
    if any(n > 255 for n in numbers[:-1]):
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number * 256 ** (3 - index)
    return ipaddress.IPv4Address(value)


def parse_port(text: str, *, original: str | None = None) -> int:
    """A TCP port from its decimal text (1..65535); raises InvalidHost naming the input."""
    if not _DIGITS_RE.fullmatch(text) or len(text) > 5:
        raise InvalidHost(
            original or text, f"port {clip(text, 20)!r} is not a number from 1 to 65535"
        )
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidHost(original or text, f"port {port} is out of range 1..65535")
    return port


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host``, ``host:443``, ``[::1]:443`` or a bare ``::1`` (no port).

    The host comes back as written (brackets removed), not normalized.
    """
    stripped = text.strip()
    if stripped.startswith("["):
        end = stripped.find("]")
        if end < 0:
            raise InvalidHost(text, "'[' without a closing ']'")
        host, rest = stripped[1:end].strip(), stripped[end + 1 :]
        if not host:
            raise InvalidHost(text, "empty host")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise InvalidHost(text, f"unexpected {clip(rest, 20)!r} after ']'")
        return host, parse_port(rest[1:], original=text)
    colons = stripped.count(":")
    if colons == 0:
        return stripped, None
    if colons > 1:
        # A bare IPv6 literal: a port would need brackets.
        return stripped, None
    host, _, port_text = stripped.partition(":")
    return host.rstrip(), parse_port(port_text, original=text)
