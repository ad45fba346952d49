"""CONNECT is answered only once the upstream connection is up.

mitmproxy answers ``200 Connection established`` before connecting when upstream connections are
lazy (which transparent capture needs: nothing may be connected before the decision). A client
would then see a tunnel open and close. Here an allowed CONNECT connects first; a refused or
unreachable destination gets ``502``/``504`` with the decision headers instead, as Squid answers.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.layers.http import HttpStream

from sidecar.answers import connect_failure_body, failure_phrase, failure_status
from sidecar.proxy.denial import egress_response
from sidecar.record import DecisionRecord
from sidecar.telemetry.spans import error_type

# flow.metadata key: the CONNECT's decision record, for the failure response.
CONNECT_RECORD = "egress.connect"


def upstream_failure(error: str) -> tuple[int, str]:
    """The status code and reason phrase for an upstream connect that failed with ``error``."""
    kind = error_type(error)
    return failure_status(kind), failure_phrase(kind)


def upstream_failure_response(rec: DecisionRecord | None, error: str) -> http.Response:
    status, reason = upstream_failure(error)
    if rec is None:  # not decided by us (cannot happen: every CONNECT is): say only what failed
        return http.Response.make(status, f"egress-sidecar: {reason}: {error}\n".encode())
    body = connect_failure_body(rec, reason, error)
    return egress_response(status, body, rec, reason, error_type(error))


def _handle_connect_regular(self: HttpStream) -> layer.CommandGenerator[None]:
    # mitmproxy's own, but connecting whatever the connection strategy (the decision is made by
    # then: http_connect ran) and answering a failed connect with our response.
    if not self.flow.response:
        err = yield commands.OpenConnection(self.context.server)
        if err:
            rec = self.flow.metadata.get(CONNECT_RECORD)
            self.flow.response = upstream_failure_response(rec, err)
    self.child_layer = layer.NextLayer(self.context)
    yield from self.handle_connect_finish()


def install_connect_after_upstream() -> None:
    HttpStream.handle_connect_regular = _handle_connect_regular  # type: ignore[method-assign]
