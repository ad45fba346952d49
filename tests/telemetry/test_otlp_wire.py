"""The hand-written OTLP encoder, read back by opentelemetry-proto's generated classes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from sidecar.telemetry import otlp_wire

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class Event:
    name: str
    timestamp: int
    attributes: dict[str, object]


@dataclass
class Span:
    trace_id: int = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    span_id: int = 0x00F067AA0BA902B7
    parent_span_id: int = 0
    trace_state: str = ""
    name: str = "GET"
    kind: int = 3
    start_ns: int = 1_700_000_000_000_000_000
    end_ns: int = 1_700_000_000_000_500_000
    attributes: dict[str, object] = field(default_factory=dict)
    block: bytes = b""
    url_full: str = ""
    events: list[Event] | None = None
    status_code: int = 0
    status_message: str | None = None
    flags: int = 0x100
    scope: bytes = otlp_wire.encode_scope("egress-sidecar", None)


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _request(resource: Mapping[str, object], spans: list[Span]) -> bytes:
    """What the exporter sends: each span encoded as it ends, then the batch around them."""
    encoded = [(span.scope, otlp_wire.encode_span(span)) for span in spans]
    return otlp_wire.encode_batch(otlp_wire.encode_resource(resource), encoded)


def _decode(resource: Mapping[str, object], spans: list[Span]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(_request(resource, spans))


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_every_span_field_reads_back() -> None:
    span = Span(
        parent_span_id=0x1122334455667788,
        trace_state="vendor=abc,other=1",
        attributes={"egress.decision": "deny", "server.port": 443, "egress.tls.passthrough": True},
        events=[Event("exception", 1_700_000_000_000_100_000, {"exception.type": "E", "n": -1})],
        status_code=2,
        status_message="denied",
        flags=0x300,
    )
    request = _decode({"service.name": "web", "k8s.pod.name": "web-1"}, [span])
    (rs,) = request.resource_spans
    assert {a.key: _value(a.value) for a in rs.resource.attributes} == {
        "service.name": "web",
        "k8s.pod.name": "web-1",
    }
    (ss,) = rs.scope_spans
    assert ss.scope.name == "egress-sidecar" and ss.scope.version == ""
    (got,) = ss.spans
    assert got.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert got.span_id.hex() == "00f067aa0ba902b7"
    assert got.parent_span_id.hex() == "1122334455667788"
    assert got.trace_state == "vendor=abc,other=1"
    assert (got.name, got.kind) == ("GET", 3)
    assert (got.start_time_unix_nano, got.end_time_unix_nano) == (span.start_ns, span.end_ns)
    assert {a.key: _value(a.value) for a in got.attributes} == span.attributes
    (event,) = got.events
    assert (event.name, event.time_unix_nano) == ("exception", 1_700_000_000_000_100_000)
    assert {a.key: _value(a.value) for a in event.attributes} == {"exception.type": "E", "n": -1}
    assert (got.status.code, got.status.message) == (2, "denied")
    assert got.flags == 0x300


def test_an_encoded_block_goes_out_with_the_span_s_other_attributes() -> None:
    block = otlp_wire.attributes(
        otlp_wire.SPAN_ATTRIBUTES, {"egress.decision": "allow", "server.port": 443}
    )
    span = Span(block=block, attributes={"url.full": "http://a.test/x"})
    (got,) = _decode({}, [span]).resource_spans[0].scope_spans[0].spans
    assert {a.key: _value(a.value) for a in got.attributes} == {
        "egress.decision": "allow",
        "server.port": 443,
        "url.full": "http://a.test/x",
    }
    (alone,) = _decode({}, [Span(block=block)]).resource_spans[0].scope_spans[0].spans
    assert [a.key for a in alone.attributes] == ["egress.decision", "server.port"]


@settings(max_examples=200, deadline=None)
@given(
    url=st.one_of(
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1),
        # lengths around the varints' byte boundaries (127/128, 16383/16384)
        st.integers(min_value=100, max_value=17_000).map(lambda n: "h" * n),
    ),
    block_attrs=st.booleans(),
)
def test_a_span_s_url_full_written_apart_reads_back_with_its_other_attributes(
    url: str, block_attrs: bool
) -> None:
    block = otlp_wire.attributes(otlp_wire.SPAN_ATTRIBUTES, {"egress.decision": "allow"})
    span = Span(block=block if block_attrs else b"", attributes={"server.port": 80}, url_full=url)
    (got,) = _decode({}, [span]).resource_spans[0].scope_spans[0].spans
    want: dict[str, object] = {"server.port": 80, "url.full": url}
    if block_attrs:
        want["egress.decision"] = "allow"
    assert {a.key: _value(a.value) for a in got.attributes} == want
    assert got.name == "GET" and got.span_id.hex() == "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "url",
    [
        # around the one-formatting path's edge (113 bytes) and the varints' byte boundaries
        *("u" * n for n in (1, 112, 113, 114, 115, 125, 126, 127, 128, 2047, 2048, 16384)),
        "é" * 56,  # 112 bytes in 56 characters
        "é" * 57,  # 114 bytes: past the edge by bytes, not by characters
        "http://web.test/ü?q=✓",
    ],
)
def test_url_full_of_any_length_reads_back(url: str) -> None:
    block = otlp_wire.attributes(otlp_wire.SPAN_ATTRIBUTES, {"egress.decision": "allow"})
    (got,) = _decode({}, [Span(block=block, url_full=url)]).resource_spans[0].scope_spans[0].spans
    assert {a.key: _value(a.value) for a in got.attributes} == {
        "egress.decision": "allow",
        "url.full": url,
    }


@pytest.mark.parametrize(
    "n", [0, 1, 127, 128, 300, 2047, 2048, 16383, 16384, 1 << 35, INT64_MAX, -1, INT64_MIN]
)
def test_varint_writes_what_protobuf_writes(n: int) -> None:
    # An AnyValue's int_value (field 3, a oneof: written even when 0) is its tag and the varint.
    assert b"\x18" + otlp_wire.varint(n) == AnyValue(int_value=n).SerializeToString()


def test_a_root_span_without_status_leaves_those_fields_empty() -> None:
    (got,) = _decode({}, [Span()]).resource_spans[0].scope_spans[0].spans
    assert got.parent_span_id == b"" and got.trace_state == ""
    assert (got.status.code, got.status.message) == (0, "")
    assert list(got.events) == []


def test_spans_group_by_their_tracer_scope() -> None:
    other = otlp_wire.encode_scope("other", "1.2")
    spans = [Span(name="a"), Span(name="b", scope=other), Span(name="c")]
    scopes = _decode({}, spans).resource_spans[0].scope_spans
    assert [(s.scope.name, s.scope.version, [x.name for x in s.spans]) for s in scopes] == [
        ("egress-sidecar", "", ["a", "c"]),
        ("other", "1.2", ["b"]),
    ]


@pytest.mark.parametrize("count", [0, 1, 2, 300, 3_000])
def test_a_batch_of_any_size_reads_back_whole(count: int) -> None:
    # The request is written with one join and every length summed ahead: 3,000 spans of two
    # scopes make the ScopeSpans' and the request's lengths varints of three bytes.
    other = otlp_wire.encode_scope("other", "1.2")
    spans = [
        Span(name=f"s{i}", scope=other if i % 3 == 0 else Span.scope, url_full="u" * (i % 200))
        for i in range(count)
    ]
    body = _request({"k": "v"}, spans)
    request = ExportTraceServiceRequest.FromString(body)
    (rs,) = request.resource_spans
    assert [(a.key, a.value.string_value) for a in rs.resource.attributes] == [("k", "v")]
    got = {s.scope.name: [x.name for x in s.spans] for s in rs.scope_spans}
    want: dict[str, list[str]] = {}
    for i in range(count):
        want.setdefault("other" if i % 3 == 0 else "egress-sidecar", []).append(f"s{i}")
    assert got == want
    if count >= 3_000:
        assert len(body) >= 1 << 14  # the lengths' three-byte varints were exercised


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ascii",
        "ünïcödé ✓ 𝄞",
        "x" * 70_000,  # a length varint of three bytes
        True,
        False,
        0,
        1,
        -1,
        127,
        128,
        INT64_MAX,
        INT64_MIN,
        0.0,
        -2.5,
        1e308,
        float("inf"),
        ["a", "", "b"],
        [1, -2, 3],
        [True, False],
        [0.5],
        [],
    ],
)
def test_attribute_values_read_back_with_their_type(value: object) -> None:
    got = _decode({}, [Span(attributes={"k": value})]).resource_spans[0].scope_spans[0].spans[0]
    (kv,) = got.attributes
    assert kv.key == "k"
    assert _same(_value(kv.value), list(value) if isinstance(value, list) else value)


def test_values_otlp_cannot_carry_are_dropped_not_the_batch() -> None:
    attrs = {"big": 1 << 64, "obj": object(), "mixed": ["a", object()], "ok": "yes"}
    got = _decode({}, [Span(attributes=attrs)]).resource_spans[0].scope_spans[0].spans[0]
    assert {a.key: _value(a.value) for a in got.attributes} == {"ok": "yes"}


def test_true_and_one_are_not_confused_by_the_cache() -> None:
    spans = [Span(attributes={"v": 1}), Span(attributes={"v": True}), Span(attributes={"v": 1.0})]
    got = _decode({}, spans).resource_spans[0].scope_spans[0].spans
    assert [_value(s.attributes[0].value) for s in got] == [1, True, 1.0]
    assert [type(_value(s.attributes[0].value)) for s in got] == [int, bool, float]


scalars = (
    st.text()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=True)
)
values = scalars | st.lists(st.text(), max_size=4) | st.lists(st.integers(INT64_MIN, INT64_MAX))
attribute_maps = st.dictionaries(st.text(min_size=1), values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(
    resource=st.dictionaries(st.text(min_size=1), st.text(), max_size=4),
    spans=st.lists(
        st.builds(
            Span,
            trace_id=st.integers(1, (1 << 128) - 1),
            span_id=st.integers(1, (1 << 64) - 1),
            parent_span_id=st.integers(0, (1 << 64) - 1),
            name=st.text(),
            kind=st.integers(0, 5),
            start_ns=st.integers(0, (1 << 64) - 1),
            end_ns=st.integers(0, (1 << 64) - 1),
            attributes=attribute_maps,
            status_code=st.integers(0, 2),
            status_message=st.none() | st.text(),
            events=st.none()
            | st.lists(
                st.builds(Event, st.text(), st.integers(0, (1 << 64) - 1), attribute_maps),
                max_size=2,
            ),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_any_span_reads_back_as_written(resource: dict[str, str], spans: list[Span]) -> None:
    request = _decode(resource, spans)
    (rs,) = request.resource_spans
    assert {a.key: _value(a.value) for a in rs.resource.attributes} == {
        k: v.encode("utf-8", "replace").decode() for k, v in resource.items()
    }
    got = rs.scope_spans[0].spans
    assert len(got) == len(spans)
    for want, span in zip(spans, got, strict=True):
        assert int.from_bytes(span.trace_id, "big") == want.trace_id
        assert int.from_bytes(span.span_id, "big") == want.span_id
        assert int.from_bytes(span.parent_span_id or b"\0", "big") == want.parent_span_id
        assert span.name == want.name.encode("utf-8", "replace").decode()
        assert (span.kind, span.start_time_unix_nano, span.end_time_unix_nano) == (
            want.kind,
            want.start_ns,
            want.end_ns,
        )
        decoded = {a.key: _value(a.value) for a in span.attributes}
        assert list(decoded) == [k.encode("utf-8", "replace").decode() for k in want.attributes]
        for (key, value), got_value in zip(want.attributes.items(), decoded.values(), strict=True):
            expected = value
            if isinstance(value, str):
                expected = value.encode("utf-8", "replace").decode()
            elif isinstance(value, list):
                expected = [
                    x.encode("utf-8", "replace").decode() if isinstance(x, str) else x
                    for x in value
                ]
            assert _same(got_value, expected), key
        assert span.status.code == want.status_code
        assert len(span.events) == len(want.events or [])
