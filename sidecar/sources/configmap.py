"""The allowlist from one or more ConfigMaps, watched through the Kubernetes API.

Each ConfigMap has its own watcher thread (sidecar.k8s.watch). A new version is parsed on that
thread and, if valid, swapped into the store before the watcher reads its next event, so an edit
is enforced as soon as the watch event arrives. Flows already decided (and CONNECT tunnels
already open) keep the snapshot they took; new ones take the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import TracerProvider

from sidecar.contract import ALLOWLIST_KEY
from sidecar.k8s.client import KubeClient
from sidecar.k8s.events import EventRecorder, InvolvedObject
from sidecar.k8s.refs import ConfigMapRef
from sidecar.k8s.watch import ConfigMapObject, ConfigMapWatcher, WatchTuning
from sidecar.metrics import Metrics
from sidecar.policy.errors import AllowlistError, Problem, clip
from sidecar.policy.model import IPNetwork
from sidecar.policy.parse import load_allowlist
from sidecar.policy.store import PolicyStore
from sidecar.sources.assemble import PolicyAssembler, SourceState
from sidecar.sources.reporting import Rejection, ReloadReporter

log = logging.getLogger(__name__)

INVALID_REASON = "InvalidAllowlist"


@dataclass(slots=True)
class _Connection:
    ok: bool = False
    error: str | None = None
    failing_since: float | None = None  # monotonic time of the first failure in a row
    uid: str = ""
    resource_version: str = ""


class ConfigMapSource:
    def __init__(
        self,
        refs: Sequence[ConfigMapRef],
        client: KubeClient,
        store: PolicyStore,
        metrics: Metrics,
        *,
        extra_private_ranges: Iterable[IPNetwork] = (),
        recorder: EventRecorder | None = None,
        tuning: WatchTuning | None = None,
        not_ready_when_api_unreachable: bool = False,
        unreachable_after: float = 10.0,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.refs = tuple(refs)
        self.client = client
        self.store = store
        self.metrics = metrics
        self.recorder = recorder
        self.not_ready_when_api_unreachable = not_ready_when_api_unreachable
        self.unreachable_after = unreachable_after
        self._by_source = {ref.source: ref for ref in self.refs}
        self.assembler = PolicyAssembler(
            [r.source for r in self.refs], store, metrics, extra_private_ranges
        )
        self.reporter = ReloadReporter(
            metrics, on_invalid=self._post_event, tracer_provider=tracer_provider
        )
        self._lock = threading.Lock()
        self._connections = {ref: _Connection() for ref in self.refs}
        self.watchers = [ConfigMapWatcher(client, ref, self, tuning) for ref in self.refs]

    # -- PolicySource ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.recorder is not None:
            self.recorder.start()
        for watcher in self.watchers:
            watcher.start()

    def stop(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        if self.recorder is not None:
            self.recorder.stop()
        self.client.close()

    def api_reachable(self) -> bool:
        now = time.monotonic()
        with self._lock:
            return all(
                c.failing_since is None or now - c.failing_since < self.unreachable_after
                for c in self._connections.values()
            )

    def ready(self) -> bool:
        if not self.assembler.all_loaded_once:
            return False
        return not self.not_ready_when_api_unreachable or self.api_reachable()

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            time.sleep(0.01)
        return self.ready()

    def status(self) -> dict[str, Any]:
        snap = self.store.get()
        now = time.monotonic()
        sources = []
        with self._lock:
            connections = dict(self._connections)
        for entry in self.assembler.entries():
            ref = self._by_source[entry.source]
            conn = connections[ref]
            sources.append(
                {
                    "source": entry.source,
                    "state": entry.state.value,
                    "version": entry.version,
                    "rejected_version": entry.rejected_version,
                    "rejected_problem": entry.rejected_problem,
                    "api": "connected"
                    if conn.failing_since is None
                    else f"failing for {now - conn.failing_since:.1f} s",
                    "api_error": conn.error,
                }
            )
        return {
            "ready": self.ready(),
            "policy": {"source": snap.source, "version": snap.version} if snap.policy else None,
            "policy_state": "loaded" if snap.policy else str(snap.unavailable),
            "api_server": self.client.host,
            "api_reachable": self.api_reachable(),
            "sources": sources,
        }

    # -- WatchListener --------------------------------------------------------------------------

    def on_connection(self, ref: ConfigMapRef, *, ok: bool, error: str | None) -> None:
        with self._lock:
            conn = self._connections[ref]
            conn.ok = ok
            conn.error = error
            if ok:
                conn.failing_since = None
            elif conn.failing_since is None:
                conn.failing_since = time.monotonic()
        self.metrics.source_connected.labels(source=ref.source).set(1 if ok else 0)
        if not ok:
            self.metrics.source_errors.labels(source=ref.source).inc()

    def on_configmap(self, obj: ConfigMapObject) -> None:
        try:
            self._load(obj)
        except Exception as err:  # a bug here must not stall the watch or skip silently
            log.exception(
                "could not load a ConfigMap version, keeping the last good one",
                extra={"source": obj.ref.source, "version": obj.resource_version},
            )
            self.reporter.failed(obj.ref.source, f"{type(err).__name__}: {err}")

    def _load(self, obj: ConfigMapObject) -> None:
        source = obj.ref.source
        with self._lock:
            conn = self._connections[obj.ref]
            conn.uid, conn.resource_version = obj.uid, obj.resource_version
        previous = self.assembler.entry(source).version
        text = obj.data.get(ALLOWLIST_KEY)
        if text is None:
            keys = clip(", ".join(sorted(obj.data)) or "none", 200)
            problem = Problem(None, None, f"no data key {ALLOWLIST_KEY!r} (keys: {keys})")
            self._reject(obj, (problem,), previous, None)
            return
        try:
            parsed = load_allowlist(text, source=source, version=obj.resource_version)
        except AllowlistError as err:
            self._reject(obj, err.problems, previous, err)
            return
        policy = parsed.policy
        self.reporter.warned(source, obj.resource_version, parsed.warnings)
        self.assembler.apply(policy)
        self.reporter.applied(
            source, obj.resource_version, previous=previous, rules=policy.rule_count
        )

    def on_absent(self, ref: ConfigMapRef, resource_version: str, *, deleted: bool) -> None:
        entry = self.assembler.entry(ref.source)
        if entry.state is SourceState.PENDING:
            log.warning(
                "allowlist ConfigMap not found: every call is denied until it exists",
                extra={"source": ref.source, "resource_version": resource_version},
            )
            return
        if entry.state is SourceState.DELETED:
            return
        self.assembler.delete(ref.source)
        self.reporter.deleted(ref.source, resource_version, previous=entry.version)

    # -- reporting ------------------------------------------------------------------------------

    def _reject(
        self,
        obj: ConfigMapObject,
        problems: Sequence[Problem],
        previous: str | None,
        error: BaseException | None,
    ) -> None:
        rejection = Rejection(
            source=obj.ref.source,
            version=obj.resource_version,
            problems=tuple(problems),
            keeping=previous,
            document=ALLOWLIST_KEY,
        )
        self.assembler.reject(obj.ref.source, obj.resource_version, rejection.summary())
        self.reporter.rejected(rejection, error)

    def _post_event(self, rejection: Rejection) -> None:
        if self.recorder is None:
            return
        ref = self._by_source[rejection.source]
        with self._lock:
            uid = self._connections[ref].uid  # of the version just rejected (same thread)
        self.recorder.warn(
            InvolvedObject(
                kind="ConfigMap",
                api_version="v1",
                namespace=ref.namespace,
                name=ref.name,
                uid=uid,
                resource_version=rejection.version,
            ),
            INVALID_REASON,
            rejection.summary(),
        )
