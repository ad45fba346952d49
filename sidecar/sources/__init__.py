"""Where the policy comes from: a file on disk or ConfigMaps through the Kubernetes API.

Each source loads, validates and swaps policies into a ``PolicyStore``; the proxy only ever reads
the store. ``open_source`` picks the adapter from the command line's options.

Readiness (``/healthz/ready``): ``ready()`` is true once every named source has had one good
version; with ``not_ready_when_api_unreachable`` it is also false while the API server has been
failing for longer than ``unreachable_after`` seconds (the last good version is enforced all the
same). ``status()`` is a JSON-able body for the health endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.contract import ENV_NODE_NAME, ENV_POD_NAME
from sidecar.metrics import Metrics
from sidecar.policy.model import IPNetwork
from sidecar.policy.store import PolicyStore

if TYPE_CHECKING:
    from sidecar.k8s.watch import WatchTuning


class PolicySource(Protocol):
    def start(self) -> None:
        """Load once (synchronously where possible) and begin watching in the background."""

    def stop(self) -> None:
        """Stop watching; the last good policy stays in the store."""

    def ready(self) -> bool:
        """Every source has had a good version (and, if so configured, the API answers)."""

    def status(self) -> dict[str, Any]:
        """What is in force and how each source is doing, for the /healthz/ready body."""


class SourceConfigError(ValueError):
    """The source options cannot work (bad --configmap, no Kubernetes config); says why."""


@dataclass(frozen=True)
class SourceSpec:
    allowlist_file: str | None = None
    configmaps: tuple[str, ...] = ()  # "[namespace/]name" each (commas inside are split too)
    kubeconfig: str | None = None
    extra_private_ranges: tuple[IPNetwork, ...] = field(default=())
    # --not-ready-when-api-unreachable: report not-ready while the API server has been failing
    # for more than `unreachable_after` seconds. Off by default: the last good version is
    # enforced either way, and flapping every pod's readiness on an API outage hurts more.
    not_ready_when_api_unreachable: bool = False
    unreachable_after: float = 10.0
    serviceaccount_dir: str | None = None  # default $EGRESS_SERVICEACCOUNT_DIR or the mount
    file_poll_interval: float = 0.2
    watch_tuning: WatchTuning | None = None
    record_events: bool = True  # Kubernetes Events on the ConfigMap for rejected versions


def open_source(
    spec: SourceSpec,
    store: PolicyStore,
    metrics: Metrics,
    environ: Mapping[str, str] | None = None,
) -> PolicySource:
    env = os.environ if environ is None else environ
    if spec.allowlist_file is not None and spec.configmaps:
        raise SourceConfigError("give --allowlist-file or --configmap, not both")
    if spec.allowlist_file is not None:
        from sidecar.sources.file import FileSource

        return FileSource(
            spec.allowlist_file,
            store,
            metrics,
            spec.extra_private_ranges,
            interval=spec.file_poll_interval,
        )
    if not spec.configmaps:
        raise SourceConfigError("no policy source: give --allowlist-file or --configmap")
    return _open_configmaps(spec, store, metrics, env)


def _open_configmaps(
    spec: SourceSpec, store: PolicyStore, metrics: Metrics, env: Mapping[str, str]
) -> PolicySource:
    import socket

    from sidecar.k8s.client import ClientOptions, KubeClient, KubeConfigError, default_namespace
    from sidecar.k8s.events import EventRecorder
    from sidecar.k8s.refs import ConfigMapRefError, needs_default_namespace, parse_refs
    from sidecar.sources.configmap import ConfigMapSource

    opts = ClientOptions(kubeconfig=spec.kubeconfig, serviceaccount_dir=spec.serviceaccount_dir)
    namespace = default_namespace(opts, env) if needs_default_namespace(spec.configmaps) else None
    try:
        refs = parse_refs(spec.configmaps, namespace)
    except ConfigMapRefError as err:
        raise SourceConfigError(str(err)) from err
    if not refs:
        raise SourceConfigError(f"--configmap names no ConfigMap: {spec.configmaps!r}")
    try:
        client = KubeClient(opts, env)
    except KubeConfigError as err:
        raise SourceConfigError(str(err)) from err
    recorder = None
    if spec.record_events:
        recorder = EventRecorder(
            client,
            instance=env.get(ENV_POD_NAME) or socket.gethostname(),
            host=env.get(ENV_NODE_NAME) or None,
        )
    return ConfigMapSource(
        refs,
        client,
        store,
        metrics,
        extra_private_ranges=spec.extra_private_ranges,
        recorder=recorder,
        tuning=spec.watch_tuning,
        not_ready_when_api_unreachable=spec.not_ready_when_api_unreachable,
        unreachable_after=spec.unreachable_after,
    )
