"""Where the policy comes from: a file on disk or ConfigMaps through the Kubernetes API.

Each source loads, validates and swaps policies into a ``PolicyStore``; the proxy only ever reads
the store. ``open_source`` picks the adapter from the command line's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sidecar.metrics import Metrics
from sidecar.policy.model import IPNetwork
from sidecar.policy.store import PolicyStore


class PolicySource(Protocol):
    def start(self) -> None:
        """Load once (synchronously where possible) and begin watching in the background."""

    def stop(self) -> None:
        """Stop watching; the last good policy stays in the store."""


@dataclass(frozen=True)
class SourceSpec:
    allowlist_file: str | None = None
    configmaps: tuple[str, ...] = ()  # "[namespace/]name" each
    kubeconfig: str | None = None
    extra_private_ranges: tuple[IPNetwork, ...] = field(default=())


def open_source(spec: SourceSpec, store: PolicyStore, metrics: Metrics) -> PolicySource:
    if spec.allowlist_file is not None:
        from sidecar.sources.file import FileSource

        return FileSource(spec.allowlist_file, store, metrics, spec.extra_private_ranges)
    raise NotImplementedError("ConfigMap sources are not built yet")
