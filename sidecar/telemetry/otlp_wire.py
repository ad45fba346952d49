"""OTLP ExportTraceServiceRequest in protobuf wire format, written by hand.

Why not the SDK's encoder: ``encode_spans`` builds a tree of protobuf (upb) message objects per
span and then serializes it; measured here it cost ~206 us per span of an egress decision (15
attributes) in the export thread, more than the whole decision path it reports. This module
writes the same bytes directly with ``bytes`` concatenation and caches what repeats between
spans (the resource, the scope, and each key=value attribute whose value is a short string, an
int or a bool): ~17 us per span on the same machine.
The fields are those of opentelemetry/proto/trace/v1/trace.proto (v1.x); the tests decode what
this writes with opentelemetry-proto's generated classes.

Out of range values are dropped the way a collector would reject them rather than failing the
whole batch: an int outside int64 and a value of any other type than str, bool, int, float or a
homogeneous sequence of those.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from sidecar.memo import remember

# Field tags (field number << 3 | wire type), as single or double bytes.
_REQ_RESOURCE_SPANS = b"\x0a"
_RS_RESOURCE = b"\x0a"
_RS_SCOPE_SPANS = b"\x12"
_RESOURCE_ATTRS = b"\x0a"
_SS_SCOPE = b"\x0a"
_SS_SPANS = b"\x12"
_SCOPE_NAME = b"\x0a"
_SCOPE_VERSION = b"\x12"
_SPAN_TRACE_ID = b"\x0a"
_SPAN_SPAN_ID = b"\x12"
_SPAN_TRACE_STATE = b"\x1a"
_SPAN_PARENT_ID = b"\x22"
_SPAN_NAME = b"\x2a"
_SPAN_KIND = b"\x30"
_SPAN_ATTR = b"\x4a"
SPAN_ATTRIBUTES = _SPAN_ATTR  # the tag of a Span's attributes, for blocks encoded ahead
_SPAN_EVENT = b"\x5a"
_SPAN_STATUS = b"\x7a"
_SPAN_FLAGS = b"\x85\x01"
_EVENT_TIME = b"\x09"
_EVENT_NAME = b"\x12"
_EVENT_ATTR = b"\x1a"
_STATUS_MESSAGE = b"\x12"
_STATUS_CODE = b"\x18"
_KV_KEY = b"\x0a"
_KV_VALUE = b"\x12"
_ANY_STRING = b"\x0a"
_ANY_BOOL_TRUE = b"\x10\x01"
_ANY_BOOL_FALSE = b"\x10\x00"
_ANY_INT = b"\x18"
_ANY_DOUBLE = b"\x21"
_ANY_ARRAY = b"\x2a"
_ARRAY_VALUES = b"\x0a"

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_SMALL = [bytes((i,)) for i in range(128)]
# Two-byte varints up to the usual size of a span (a length per span in each batch): a list
# look-up instead of a call that builds them (~180 ns), for ~80 KiB.
_TWO_BYTE_MAX = 2048
_VARINTS = _SMALL + [bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(128, _TWO_BYTE_MAX)]
_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack
_times = struct.Struct("<BQBQ").pack
_flag_fields = {f: b"\x85\x01" + _fixed32(f) for f in (0x100, 0x300)}

# Attributes seen again and again (decision, reason, source, port...) are encoded once.
_CACHE_MAX = 4096
_CACHEABLE_STR = 64


class WireEvent(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def attributes(self) -> Mapping[str, object]: ...


class WireSpan(Protocol):
    """What the encoder reads of a span (sidecar.telemetry.lean.LeanSpan)."""

    @property
    def trace_id(self) -> int: ...
    @property
    def span_id(self) -> int: ...
    @property
    def parent_span_id(self) -> int: ...  # 0: a root span
    @property
    def trace_state(self) -> str: ...  # the W3C tracestate header value, "" for none
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> int: ...  # the OTLP enum (API SpanKind value + 1)
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...
    @property
    def attributes(self) -> Mapping[str, object]: ...
    @property
    def block(self) -> bytes: ...  # attribute fields encoded already (``attributes``'s tag)
    @property
    def url_full(self) -> str: ...  # the url.full attribute ("" none), apart: unique per call
    @property
    def events(self) -> Sequence[WireEvent] | None: ...
    @property
    def status_code(self) -> int: ...  # 0 unset, 1 ok, 2 error
    @property
    def status_message(self) -> str | None: ...
    @property
    def flags(self) -> int: ...
    @property
    def scope(self) -> bytes: ...  # the encoded InstrumentationScope of the span's tracer


def varint(n: int) -> bytes:
    if 0 <= n < _TWO_BYTE_MAX:
        return _VARINTS[n]
    if n < 0:
        return varint(n + (1 << 64))
    if n < 0x4000:  # two bytes
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def _scalar(value: object) -> bytes | None:
    """The AnyValue bytes of one value, None when it cannot be one."""
    if isinstance(value, str):
        return _field(_ANY_STRING, value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return _ANY_INT + varint(value)
        return None
    if isinstance(value, float):
        return _ANY_DOUBLE + _double(value)
    return None


def any_value(value: object) -> bytes | None:
    scalar = _scalar(value)
    if scalar is not None or isinstance(value, (str, bytes)):
        return scalar
    if isinstance(value, Sequence):
        items = []
        for item in value:
            encoded = _scalar(item)
            if encoded is None:
                return None
            items.append(_field(_ARRAY_VALUES, encoded))
        return _field(_ANY_ARRAY, b"".join(items))
    return None


def key_value(key: str, value: object) -> bytes | None:
    """A KeyValue message (without its own field tag), None for a value OTLP cannot carry."""
    encoded = any_value(value)
    if encoded is None:
        return None
    return _field(_KV_KEY, key.encode("utf-8", "replace")) + _field(_KV_VALUE, encoded)


# Tagged KeyValue fields, per field tag, by the (key, value) item itself when the value is a
# short string (most attributes of an egress span repeat from one span to the next), else by
# (key, type, value) for ints and bools: True == 1 and their encodings differ. A str never equals
# an int, so the two kinds of entry cannot be confused. Values unique per call are not cached.
_UNCACHED_KEYS = frozenset({"url.full", "egress.upstream.error", "exception.stacktrace"})
_caches: dict[bytes, dict[object, bytes]] = {}


_key_fields: dict[str, bytes] = {}


def _uncached(tag: bytes, cache: dict[object, bytes], item: tuple[str, object]) -> bytes:
    key, value = item
    kind = type(value)
    typed = (key, kind, value)
    if kind is bool or kind is int:
        hit = cache.get(typed)
        if hit is not None:
            return hit
    key_field = _key_fields.get(key)
    if key_field is None:
        key_field = remember(
            _key_fields, key, _field(_KV_KEY, key.encode("utf-8", "replace")), _CACHE_MAX
        )
    if kind is str:  # the common case, inline (url.full of every plain HTTP span comes here)
        raw: bytes = value.encode("utf-8", "replace")  # type: ignore[attr-defined]
        encoded = _ANY_STRING + varint(len(raw)) + raw
    else:
        other = any_value(value)
        if other is None:
            return b""  # dropped: OTLP cannot carry it
        encoded = other
    kv = key_field + _KV_VALUE + varint(len(encoded)) + encoded
    tagged = tag + varint(len(kv)) + kv
    if key not in _UNCACHED_KEYS:
        if isinstance(value, str) and len(value) <= _CACHEABLE_STR:
            remember(cache, item, tagged, _CACHE_MAX)
        elif kind is bool or kind is int:
            remember(cache, typed, tagged, _CACHE_MAX)
    return tagged


def attributes(tag: bytes, attrs: Mapping[str, object]) -> bytes:
    """The attributes as repeated KeyValue fields of tag ``tag``, skipping unencodable ones."""
    cache = _caches.get(tag)
    if cache is None:
        cache = _caches[tag] = {}
    get = cache.get
    try:
        return b"".join([get(item) or _uncached(tag, cache, item) for item in attrs.items()])
    except TypeError:  # an unhashable value (a list): no look-up by item
        return b"".join([_uncached(tag, cache, item) for item in attrs.items()])


def encode_resource(attrs: Mapping[str, object]) -> bytes:
    """The ResourceSpans.resource field, computed once per provider."""
    return _field(_RS_RESOURCE, attributes(_RESOURCE_ATTRS, attrs))


def encode_scope(name: str, version: str | None) -> bytes:
    """The ScopeSpans.scope field of a tracer, computed once per tracer."""
    body = _field(_SCOPE_NAME, name.encode("utf-8", "replace")) if name else b""
    if version:
        body += _field(_SCOPE_VERSION, version.encode("utf-8", "replace"))
    return _field(_SS_SCOPE, body)


def _event(event: WireEvent) -> bytes:
    parts = [_EVENT_TIME, _fixed64(event.timestamp)]
    if event.name:
        parts.append(_field(_EVENT_NAME, event.name.encode("utf-8", "replace")))
    parts.append(attributes(_EVENT_ATTR, event.attributes))
    return _field(_SPAN_EVENT, b"".join(parts))


# trace_id (field 1) and span_id (field 2) in one int.to_bytes: tag, 16 bytes, tag, 8 bytes.
_IDS_TAG = _SPAN_TRACE_ID + b"\x10"
_SPAN_ID_TAG = int.from_bytes(_SPAN_SPAN_ID + b"\x08") << 64
_PARENT_ID_TAG = int.from_bytes(_SPAN_PARENT_ID + b"\x08") << 64
_URL_FULL_KEY = _field(_KV_KEY, b"url.full")
_heads: dict[tuple[str, int], bytes] = {}  # a span's name and kind fields, by name and kind


def _head(name: str, kind: int) -> bytes:
    head = _field(_SPAN_NAME, name.encode("utf-8", "replace")) if name else b""
    if kind:
        head += _SPAN_KIND + _SMALL[kind]
    return remember(_heads, (name, kind), head, _CACHE_MAX)


# A Span attribute field url.full=<n bytes>, for n < _URL_ONE_BYTE: every length in it one byte.
_URL_FULL_FIELD = _SPAN_ATTR + b"%c" + _URL_FULL_KEY + _KV_VALUE + b"%c" + _ANY_STRING + b"%c%b"
_URL_ONE_BYTE = 0x80 - len(_URL_FULL_KEY) - 4  # the KeyValue's length stays under 128


def _string_attribute(key: bytes, value: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """A Span attribute field of a string value, as parts: ``key`` its encoded key field."""
    raw = value.encode("utf-8", "replace")
    size = varint(len(raw))
    any_size = varint(1 + len(size) + len(raw))  # the AnyValue: tag, length, bytes
    return (
        _SPAN_ATTR,
        varint(len(key) + 1 + len(any_size) + 1 + len(size) + len(raw)),  # the KeyValue's
        key + _KV_VALUE + any_size,
        _ANY_STRING + size,
        raw,
    )


def encode_span(span: WireSpan) -> bytes:
    """One Span message (without its own field tag)."""
    parts = [_IDS_TAG, (span.trace_id << 80 | _SPAN_ID_TAG | span.span_id).to_bytes(26, "big")]
    if span.trace_state:
        parts.append(_field(_SPAN_TRACE_STATE, span.trace_state.encode("utf-8", "replace")))
    if span.parent_span_id:
        parts.append((_PARENT_ID_TAG | span.parent_span_id).to_bytes(10, "big"))
    head = _heads.get((span.name, span.kind))
    parts += (
        head if head is not None else _head(span.name, span.kind),
        _times(0x39, span.start_ns, 0x41, span.end_ns),  # start, end: fixed64
        span.block,
    )
    if span.attributes:
        parts.append(attributes(_SPAN_ATTR, span.attributes))
    url = span.url_full
    if url:
        raw = url.encode("utf-8", "replace")
        n = len(raw)
        if n < _URL_ONE_BYTE:  # most URLs: the field in one formatting
            parts.append(_URL_FULL_FIELD % (n + len(_URL_FULL_KEY) + 4, n + 2, n, raw))
        else:
            parts += _string_attribute(_URL_FULL_KEY, url)
    if span.events:
        parts += [_event(e) for e in span.events]
    if span.status_code or span.status_message:
        status = (
            _field(_STATUS_MESSAGE, span.status_message.encode("utf-8", "replace"))
            if span.status_message
            else b""
        )
        if span.status_code:
            status += _STATUS_CODE + _SMALL[span.status_code]
        parts.append(_field(_SPAN_STATUS, status))
    if span.flags:
        parts.append(_flag_fields.get(span.flags) or _SPAN_FLAGS + _fixed32(span.flags))
    return b"".join(parts)


def encode_batch(resource: bytes, encoded: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An ExportTraceServiceRequest of spans encoded already, each as (its scope, its Span
    message): one ResourceSpans, one ScopeSpans per scope, spans in the order given.

    Written with one join: every length is summed as the parts are made, so the batch (a few
    hundred KiB) is copied once. Joined level by level it was copied five times, each into a
    fresh buffer of that size whose pages the kernel had to fault in again (~220 minor faults
    a batch of 512: time spent in the kernel, for each export)."""
    groups: dict[bytes, list[bytes]] = {}
    sizes: dict[bytes, int] = {}
    for scope, body in encoded:
        length = varint(len(body))
        group = groups.get(scope)
        if group is None:
            group = groups[scope] = []
            sizes[scope] = 0
        group += (_SS_SPANS, length, body)
        sizes[scope] += 1 + len(length) + len(body)
    parts = [_REQ_RESOURCE_SPANS, b"", resource]
    total = len(resource)
    for scope, group in groups.items():
        size = len(scope) + sizes[scope]
        head = _RS_SCOPE_SPANS + varint(size)
        total += len(head) + size
        parts += (head, scope)
        parts += group
    parts[1] = varint(total)
    return b"".join(parts)
