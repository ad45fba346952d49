"""Allowlist from a file (a bare document or a ConfigMap manifest), hot-reloaded.

A ConfigMap mounted as a volume is updated by the kubelet's AtomicWriter: it writes the new
files into a fresh ``..<timestamp>`` directory, points a ``..data_tmp`` symlink at it and
renames that over ``..data`` (atomic), then removes the old directory. ``allowlist.yaml`` itself
is a symlink to ``..data/allowlist.yaml`` and never changes, so inotify on it (or its mtime through
the symlink before the swap) says nothing useful. We poll instead, every ``interval`` seconds,
the identity of what the path resolves to: (realpath, inode, size, mtime). Any change means a
new read; the read text is checked against its digest, so touching a file is not a reload.

Polling a few stat calls every 200 ms costs nothing measurable and needs no dependency; the
kubelet itself only syncs mounted ConfigMaps every minute or so, so 200 ms is never the
bottleneck.

A file that cannot be read (missing, permission) after a good load keeps the last good version
(result ``error``); before one, every call stays denied (``policy not loaded``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.trace import TracerProvider

from sidecar.metrics import Metrics
from sidecar.policy.errors import AllowlistError, Problem
from sidecar.policy.model import IPNetwork
from sidecar.policy.parse import DEFAULT_LIMITS, digest, load_allowlist
from sidecar.policy.store import PolicyStore
from sidecar.sources.assemble import PolicyAssembler
from sidecar.sources.reporting import Rejection, ReloadReporter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    realpath: str
    inode: int
    size: int
    mtime_ns: int


def identify(path: Path) -> FileIdentity | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return FileIdentity(real, st.st_ino, st.st_size, st.st_mtime_ns)


class FileSource:
    def __init__(
        self,
        path: str,
        store: PolicyStore,
        metrics: Metrics,
        extra_private_ranges: Iterable[IPNetwork] = (),
        *,
        interval: float = 0.2,
        assembler: PolicyAssembler | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.source = f"file:{self.path}"
        self.assembler = assembler or PolicyAssembler(
            [self.source], store, metrics, extra_private_ranges
        )
        self.reporter = ReloadReporter(metrics, tracer_provider=tracer_provider)
        self._seen: FileIdentity | None = None
        self._text_digest: str | None = None  # of the last text handled (applied or rejected)
        self._read_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checks = 0

    # -- PolicySource ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load synchronously once, then poll in the background."""
        self.check()
        self._thread = threading.Thread(
            target=self._run, name=f"watch-file-{self.path.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def ready(self) -> bool:
        return self.assembler.all_loaded_once

    def status(self) -> dict[str, Any]:
        snap = self.store.get()
        entry = self.assembler.entry(self.source)
        return {
            "ready": self.ready(),
            "policy": {"source": snap.source, "version": snap.version} if snap.policy else None,
            "policy_state": "loaded" if snap.policy else str(snap.unavailable),
            "sources": [
                {
                    "source": self.source,
                    "state": entry.state.value,
                    "version": entry.version,
                    "rejected_version": entry.rejected_version,
                    "rejected_problem": entry.rejected_problem,
                    "read_error": self._read_error,
                }
            ],
        }

    # -- polling --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the poller die
                log.exception("allowlist file check failed", extra={"source": self.source})

    def check(self) -> bool:
        """Reload if the file changed; True when a new version was applied."""
        self.checks += 1
        ident = identify(self.path)
        if ident is None:
            if self._read_error is None:
                self._read_error = f"{self.path}: cannot be read"
                self.reporter.failed(self.source, self._read_error)
            return False
        if ident == self._seen:
            return False
        if ident.size > DEFAULT_LIMITS.max_bytes:
            # Not even read: the parser would refuse it, and reading costs its whole size.
            self._seen = ident
            self._text_digest = None
            version = f"size:{ident.size}"
            problem = Problem(
                None,
                None,
                f"the file is {ident.size} bytes, larger than the {DEFAULT_LIMITS.max_bytes} "
                "bytes an allowlist may have",
            )
            self._rejected(version, (problem,), None)
            return False
        try:
            text = _read_bounded(Path(ident.realpath), DEFAULT_LIMITS.max_bytes)
        except (OSError, UnicodeDecodeError) as err:
            message = f"{self.path}: {err}"
            if message != self._read_error:
                self._read_error = message
                self.reporter.failed(self.source, message)
            return False
        if identify(self.path) != ident:
            return False  # changed while we read: take it on the next tick, whole
        self._seen = ident
        self._read_error = None
        text_digest = digest(text)
        if text_digest == self._text_digest:
            return False
        self._text_digest = text_digest
        previous = self.assembler.entry(self.source).version
        try:
            parsed = load_allowlist(text, source=self.source)
        except AllowlistError as err:
            self._rejected(text_digest, err.problems, err)
            return False
        policy = parsed.policy
        self.reporter.warned(self.source, policy.meta.version, parsed.warnings)
        if policy.meta.version == previous:
            return False  # the same rules re-wrapped (e.g. bare <-> manifest): nothing to swap
        self.assembler.apply(policy)
        self.reporter.applied(
            self.source, policy.meta.version, previous=previous, rules=policy.rule_count
        )
        return True

    def _rejected(
        self, version: str, problems: tuple[Problem, ...], error: AllowlistError | None
    ) -> None:
        previous = self.assembler.entry(self.source).version
        rejection = Rejection(self.source, version, problems, previous, document=str(self.path))
        self.assembler.reject(self.source, version, rejection.summary())
        self.reporter.rejected(rejection, error)


def _read_bounded(path: Path, limit: int) -> str:
    """The file's text, at most ``limit`` bytes and one more: a file that grew after its stat is
    still not read whole (the parser then refuses it for its size)."""
    with path.open("rb") as f:
        return f.read(limit + 1).decode("utf-8")
