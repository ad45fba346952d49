"""Denied and audited calls, and rejected or deleted policies, are always sampled, whatever
OTEL_TRACES_SAMPLER says: they are what users look for in Jaeger."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

ALWAYS_KEPT = frozenset({"deny", "audit"})
ALWAYS_KEPT_RELOADS = frozenset({"invalid", "deleted"})


def always_kept(attributes: Attributes) -> bool:
    """A denial, an audit, a rejected or deleted policy: sampled whatever the sampler says."""
    if not attributes:
        return False
    decision = attributes.get("egress.decision")
    reload = attributes.get("egress.policy.reload.result")
    return (isinstance(decision, str) and decision in ALWAYS_KEPT) or (
        isinstance(reload, str) and reload in ALWAYS_KEPT_RELOADS
    )


class DecisionSampler(Sampler):
    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    @property
    def delegate(self) -> Sampler:
        return self._delegate

    def should_sample(  # noqa: PLR0917 (the SDK's signature)
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if always_kept(attributes):
            parent_state = get_current_span(parent_context).get_span_context().trace_state
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, parent_state)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"DecisionSampler{{deny,audit always; else {self._delegate.get_description()}}}"
