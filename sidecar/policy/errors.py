"""Errors of the policy core: each names the input at fault and, for documents, the line."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class PolicyError(Exception):
    """Base of every error raised by ``sidecar.policy``."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an allowlist document.

    ``line``/``column`` are 1-based positions in the file as given (for a ConfigMap manifest: the
    manifest file, not the embedded document), or None when no position is known.
    """

    line: int | None
    column: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return self.message
        return f"line {self.line}: {self.message}"


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
        super().__init__(f"{host!r} is not a valid host: {reason}")
