"""Reports each decision once: a span, a JSON log line and a metric sample."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.trace import Span

from sidecar.decision_log import DecisionLog
from sidecar.metrics import Metrics
from sidecar.record import DecisionRecord
from sidecar.telemetry.spans import DecisionSpans


@dataclass(slots=True)
class OpenDecision:
    """A decision whose outcome (status code, upstream error) is still to come."""

    record: DecisionRecord
    span: Span
    done: bool = False


class Reporter:
    def __init__(self, spans: DecisionSpans, log: DecisionLog, metrics: Metrics) -> None:
        self._spans = spans
        self._log = log
        self._metrics = metrics

    def begin(
        self, rec: DecisionRecord, *, parent: Context | None = None, start_ns: int | None = None
    ) -> OpenDecision:
        return OpenDecision(rec, self._spans.start(rec, parent=parent, start_ns=start_ns))

    def end(self, open_decision: OpenDecision) -> None:
        if open_decision.done:
            return
        open_decision.done = True
        rec = open_decision.record
        self._spans.finish(open_decision.span, rec)
        self._log.write(rec)
        self._metrics.decisions.labels(
            decision=rec.verdict.value, reason=rec.decision.reason.value, capture=rec.capture.value
        ).inc()

    def report(self, rec: DecisionRecord, *, start_ns: int | None = None) -> None:
        self.end(self.begin(rec, start_ns=start_ns))
