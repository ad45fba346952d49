"""Review of issue 8 items 4, 5 and 11 on the transparent listener: first flights that were
relayed as raw TCP by address, and Host headers the authority parser refuses, so a name deny
rule never saw their Host or SNI (nginx 1.22 routed each of them to the denied.test vhost).

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


@pytest.mark.parametrize(
    "host_header",
    ["denied.test:", "denied.test:abc", "user@denied.test", "denied.test:80:80", "denied.test\\\\"],
    ids=["empty-port", "letters-port", "userinfo", "two-ports", "backslash"],
)
def test_a_host_header_check_would_refuse_is_refused_not_decided_by_address(
    pod: Pod,  # noqa: F811
    host_header: str,
) -> None:
    """A Host the authority parser refuses named no host, so the request was decided on the
    cidr-allowed address and relayed with that Host, which nginx reads as denied.test (it cuts
    a Host at ':' and checks no port). RFC 9112 3.2: a Host with an invalid value gets 400."""
    mark = pod.upstream.mark()
    head = f"GET /x HTTP/1.1\\r\\nHost: {host_header}\\r\\nConnection: close\\r\\n\\r\\n"
    result = pod.world.client("raw", DB4, "80", head, uid=APP_UID)
    assert result["received"].startswith("HTTP/1.1 400"), result
    assert "x-egress-reason: invalid destination" in result["received"].lower(), result
    time.sleep(0.3)
    assert not pod.events(mark, DB4, 80, "request")
