"""Allowlist from a file (a bare document or a ConfigMap manifest)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from sidecar.metrics import Metrics
from sidecar.policy.errors import AllowlistError
from sidecar.policy.model import IPNetwork
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore

log = logging.getLogger(__name__)


class FileSource:
    def __init__(
        self,
        path: str,
        store: PolicyStore,
        metrics: Metrics,
        extra_private_ranges: Sequence[IPNetwork] = (),
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.metrics = metrics
        self.extra_private_ranges = tuple(extra_private_ranges)
        self.source = f"file:{self.path}"

    def load(self) -> bool:
        text = self.path.read_text(encoding="utf-8")
        try:
            policy = parse_allowlist(text, source=self.source)
        except AllowlistError as err:
            self.metrics.reloads.labels(source=self.source, result="invalid").inc()
            log.error("allowlist rejected, keeping the last good version: %s", err)
            return False
        policy = policy.with_extra_private_ranges(self.extra_private_ranges)
        self.store.set_policy(policy)
        self.metrics.set_policy_info(policy.meta.source, policy.meta.version)
        self.metrics.reloads.labels(source=self.source, result="applied").inc()
        log.info("allowlist loaded", extra={"source": self.source, "version": policy.meta.version})
        return True

    def start(self) -> None:
        self.load()

    def stop(self) -> None:
        pass
