"""Small conversions between mitmproxy's strings and the policy core's values."""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from sidecar.policy.model import IPAddress

# Query parameters that carry credentials in signed URLs (OpenTelemetry's url.full guidance).
_SECRET_QUERY_KEYS = frozenset(
    {"awsaccesskeyid", "signature", "sig", "x-goog-signature", "x-amz-signature", "token"}
)
REDACTED = "REDACTED"


@functools.lru_cache(maxsize=4096)
def address_of(text: str) -> IPAddress | None:
    """The IP address in ``text`` ("1.2.3.4", "::1", "[::1]"), or None for a name.

    Cached: every request asks it of its host, and a name costs a ValueError to find out."""
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """url.full without credentials: user:password and signature-like query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}:{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs]
            )
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def format_hostport(host: str, port: int, default_port: int | None = None) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:443``); the port left out when it
    is ``default_port`` (as in a Host header)."""
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port == default_port else f"{bracketed}:{port}"
