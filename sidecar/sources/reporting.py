"""What happens on each reload, told to the log, the metrics, a span and (ConfigMaps) an Event.

A rejected version is reported everywhere an operator might look: a JSON log line naming the
source, version, line and problem; ``egress_policy_reloads_total{result="invalid"}`` and the
last-invalid timestamp; a ``policy reload`` span with status ERROR, an ``exception`` event and one
``allowlist.problem`` event per problem; and a Warning Event on the ConfigMap (``kubectl describe
cm`` shows it), through the ``on_invalid`` hook the ConfigMap source installs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar.memory import LARGE_POLICY_RULES, release_freed_memory
from sidecar.metrics import Metrics
from sidecar.policy.errors import Problem

log = logging.getLogger(__name__)

TRACER_NAME = "egress-sidecar"
SPAN_NAME = "policy reload"


class ReloadResult(StrEnum):
    APPLIED = "applied"
    INVALID = "invalid"
    DELETED = "deleted"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A version that failed validation, with what is still in force instead."""

    source: str
    version: str
    problems: tuple[Problem, ...]
    keeping: str | None  # the version still enforced for this source, None before any good load
    document: str = "allowlist.yaml"  # what the problems' line numbers refer to

    def problem_lines(self) -> list[str]:
        out = []
        for p in self.problems:
            where = []
            if p.line is not None:
                where.append(f"line {p.line}")
            if p.column is not None:
                where.append(f"column {p.column}")
            prefix = f"{self.document} {', '.join(where)}: " if where else f"{self.document}: "
            out.append(prefix + p.message)
        return out

    def summary(self) -> str:
        keeping = (
            f"still enforcing version {self.keeping}"
            if self.keeping
            else "no earlier good version: every call is denied (policy not loaded)"
        )
        return (
            f"rejected {self.source} version {self.version}: "
            + "; ".join(self.problem_lines())
            + f" -- {keeping}"
        )


class ReloadReporter:
    def __init__(
        self,
        metrics: Metrics,
        on_invalid: Callable[[Rejection], None] | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.metrics = metrics
        self.on_invalid = on_invalid
        # None: the global provider the run command installs (a proxy until it does).
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)

    def _span(
        self, source: str, version: str, result: ReloadResult, error: str | None = None
    ) -> trace.Span:
        span = self._tracer.start_span(
            SPAN_NAME,
            kind=SpanKind.INTERNAL,
            attributes={
                "egress.policy.source": source,
                "egress.policy.version": version,
                "egress.policy.reload.result": result.value,
            },
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        return span

    def warned(self, source: str, version: str, warnings: Iterable[Problem]) -> None:
        """Warnings of a version that is applied all the same (e.g. a very wide CIDR)."""
        for warning in warnings:
            log.warning(
                "allowlist warning: %s",
                str(warning),
                extra={"source": source, "version": version, "line": warning.line},
            )

    def applied(self, source: str, version: str, *, previous: str | None, rules: int) -> None:
        self.metrics.reloads.labels(source=source, result=ReloadResult.APPLIED.value).inc()
        log.info(
            "allowlist applied",
            extra={
                "source": source,
                "version": version,
                "previous_version": previous,
                "rules": rules,
            },
        )
        self._span(source, version, ReloadResult.APPLIED).end()
        if rules >= LARGE_POLICY_RULES:
            release_freed_memory()  # the parse's garbage, held by the allocator otherwise

    def rejected(self, rejection: Rejection, error: BaseException | None = None) -> None:
        source, version = rejection.source, rejection.version
        self.metrics.reloads.labels(source=source, result=ReloadResult.INVALID.value).inc()
        self.metrics.last_reload_error.labels(source=source).set(time.time())
        problems = [
            {"line": p.line, "column": p.column, "message": p.message} for p in rejection.problems
        ]
        log.error(
            "allowlist rejected, keeping the last good version"
            if rejection.keeping is not None
            else "allowlist rejected; no good version yet, every call is denied",
            extra={
                "source": source,
                "version": version,
                "keeping_version": rejection.keeping or "",
                "problems": problems,
                "problem": "; ".join(rejection.problem_lines()),
            },
        )
        span = self._span(source, version, ReloadResult.INVALID, "allowlist rejected")
        if error is not None:
            span.record_exception(error)
        else:
            span.add_event(
                "exception",
                {"exception.type": "AllowlistError", "exception.message": rejection.summary()},
            )
        for p in rejection.problems:
            attributes: dict[str, str | int] = {"message": p.message}
            if p.line is not None:
                attributes["line"] = p.line
            if p.column is not None:
                attributes["column"] = p.column
            span.add_event("allowlist.problem", attributes)
        span.end()
        if self.on_invalid is not None:
            try:
                self.on_invalid(rejection)
            except Exception:  # reporting must never break the reload path
                log.exception("could not report a rejected allowlist", extra={"source": source})

    def deleted(self, source: str, version: str, *, previous: str | None) -> None:
        self.metrics.reloads.labels(source=source, result=ReloadResult.DELETED.value).inc()
        log.warning(
            "allowlist source deleted: denying what it allowed until it comes back",
            extra={"source": source, "version": version, "previous_version": previous},
        )
        self._span(source, version, ReloadResult.DELETED, "policy deleted").end()

    def failed(self, source: str, error: str) -> None:
        """The source could not be read (not a validation failure): the last good stays."""
        self.metrics.reloads.labels(source=source, result=ReloadResult.ERROR.value).inc()
        log.warning(
            "allowlist source could not be read, keeping the last good version",
            extra={"source": source, "error": error},
        )


def problems_of(messages: Sequence[str]) -> tuple[Problem, ...]:
    return tuple(Problem(None, None, m) for m in messages)
