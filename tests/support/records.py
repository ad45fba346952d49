"""A decision record for unit tests of what reports it (spans, the decision line)."""

from __future__ import annotations

from sidecar.policy.model import Decision, Reason, Verdict
from sidecar.record import Capture, DecisionRecord


def decision_record(**fields: object) -> DecisionRecord:
    """An allowed explicit GET to web.test:80, with ``fields`` set over it."""
    rec = DecisionRecord(
        decision=Decision(Verdict.ALLOW, Reason.MATCHED_ALLOW, "web.test"),
        capture=Capture.EXPLICIT,
        protocol="GET",
        host="web.test",
        port=80,
        policy_source="file:/etc/egress/allowlist.yaml",
        policy_version="sha256:abc",
        mode="enforce",
    )
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec
