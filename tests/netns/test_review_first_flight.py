"""Review of issue 8 items 4 and 5 on the transparent listener: first flights that were relayed
as raw TCP by address, so a name deny rule never saw their Host or SNI.

Same pod as test_first_flight (DB4 allowed by a cidr rule on 80 and 5432; denied.test denied by
name): a request with an extension method, empty lines before its request line or tabs between
its words is decided by its Host; a ClientHello behind a leading alert record is refused. The
upstreams log every request and every byte, so "nothing went up" is checked where it lands.
"""

from __future__ import annotations

import time

import pytest

from tests.netns.conftest import APP_UID
from tests.netns.test_first_flight import DB4, Pod, pod  # noqa: F401 (the module's pod)
from tests.proxy.test_wire_first_flight import client_hello


def _escaped(data: bytes) -> str:
    """For netns_client's ``raw`` (backslash escapes)."""
    return "".join(f"\\x{b:02x}" for b in data)


@pytest.mark.parametrize(
    "request_head",
    [
        "\\r\\nGET /x HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n",
        "PROPFIND /x HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n",
        "get /x HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n",
        "GET\\t/x\\tHTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n",
    ],
    ids=["empty-line-first", "extension-method", "lowercase-method", "tabs"],
)
def test_a_denied_host_in_any_request_line_to_a_cidr_allowed_address_is_refused(
    pod: Pod,  # noqa: F811
    request_head: str,
) -> None:
    mark = pod.upstream.mark()
    denied = pod.world.client(
        "raw", DB4, "80", request_head.format(host="denied.test"), uid=APP_UID
    )
    assert denied["received"].startswith("HTTP/1.1 403"), denied
    assert "x-egress-reason: matched deny rule" in denied["received"].lower(), denied
    time.sleep(0.3)  # a late (wrong) relay would show up by now
    assert not pod.events(mark, DB4, 80, "request")  # (connected early: it may speak first)


def test_the_same_request_lines_with_an_allowed_host_still_go_through(
    pod: Pod,  # noqa: F811
) -> None:
    mark = pod.upstream.mark()
    head = "\\r\\nPROPFIND /x HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n"
    allowed = pod.world.client("raw", DB4, "80", head.format(host=DB4), uid=APP_UID)
    assert allowed["received"].startswith("HTTP/1.1 200"), allowed
    (request,) = pod.events(mark, DB4, 80, "request")
    assert request["method"] == "PROPFIND" and request["headers"]["host"] == DB4


def test_a_clienthello_behind_an_alert_record_is_refused_and_sends_nothing(
    pod: Pod,  # noqa: F811
) -> None:
    """A warning alert first, then a ClientHello naming denied.test, to the cidr-allowed echo
    server: was raw TCP (the first byte was not a handshake), relayed by address."""
    mark = pod.upstream.mark()
    flight = b"\x15\x03\x01\x00\x02\x01\x5a" + client_hello("denied.test")
    result = pod.world.client("raw", DB4, "5432", _escaped(flight), uid=APP_UID)
    assert result["received"] == "", result
    time.sleep(0.3)
    assert not pod.events(mark, DB4, 5432, "data")
    decision = pod.last_decision(protocol="TLS", reason="unreadable first flight", port=5432)
    assert decision["decision"] == "deny"
