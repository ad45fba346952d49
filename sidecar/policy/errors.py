"""Errors of the policy core: each names the input at fault and, for documents, the line."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

# Input quoted in a message is cut to this many characters: a 2 MiB host name must not make a
# 2 MiB log line, Kubernetes Event or HTTP header.
MAX_QUOTED = 80


def clip(text: object, limit: int = MAX_QUOTED) -> str:
    """``text`` for a message: at most ``limit`` characters, then ``… (N characters)``.

    Control characters are escaped so that quoted input cannot break a log line in two.
    """
    value = text if isinstance(text, str) else str(text)
    head = value[:limit]
    if not head.isprintable():
        head = head.encode("unicode_escape").decode("ascii")[: limit * 2]
    if len(value) <= limit:
        return head
    return f"{head}… ({len(value)} characters)"


def quote(text: object, limit: int = MAX_QUOTED) -> str:
    """``"text"`` clipped as ``clip`` does, the length outside the quotes."""
    value = text if isinstance(text, str) else str(text)
    clipped = clip(value[:limit], limit)
    if len(value) <= limit:
        return f'"{clipped}"'
    return f'"{clipped}…" ({len(value)} characters)'


class PolicyError(Exception):
    """Base of every error raised by ``sidecar.policy``."""


class Severity(StrEnum):
    ERROR = "error"  # the document is rejected
    WARNING = "warning"  # accepted, but worth a second look (e.g. a very wide CIDR)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong (or, as a warning, suspicious) in an allowlist document.

    ``line``/``column`` are 1-based positions in the file as given (for a ConfigMap manifest: the
    manifest file, not the embedded document), or None when no position is known.
    """

    line: int | None
    column: int | None
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        prefix = "warning: " if self.severity is Severity.WARNING else ""
        if self.line is None:
            return prefix + self.message
        return f"line {self.line}: {prefix}{self.message}"


class AllowlistError(PolicyError):
    """A rejected allowlist document, with every problem found in it (not just the first)."""

    def __init__(self, problems: Iterable[Problem], *, source: str) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        for problem in self.problems:
            where = self.source if problem.line is None else f"{self.source}:{problem.line}"
            lines.append(f"{where}: {problem.message}")
        return "\n".join(lines) if lines else f"{self.source}: invalid allowlist"

    def __str__(self) -> str:
        return self._render()


class InvalidHost(PolicyError, ValueError):  # noqa: N818 (name fixed by the API)
    """A host name, address or host:port that cannot be used; names the text at fault."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"{clip(host)!r} is not a valid host: {clip(reason, 200)}")
