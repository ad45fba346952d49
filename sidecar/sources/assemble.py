"""From the state of each source (one file, or one or more ConfigMaps) to the policy in force.

Rules, fail closed throughout:

- until every named source has had one good version, nothing is allowed: the store stays
  unavailable with ``policy not loaded`` (a union missing one member could miss its deny rules);
- a rejected version changes nothing: each source keeps its last good version;
- a deleted source denies everything only it allowed, with ``policy deleted``, and its deny rules
  stay in force, until it comes back; when every source is deleted the store is unavailable with
  ``policy deleted``;
- several sources combine as a union where a deny rule from any of them wins.

Each change builds a new immutable snapshot and swaps it into the store in one assignment, under
a lock so that two sources changing at once publish in order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sidecar.metrics import Metrics
from sidecar.policy.engine import Policy, combine
from sidecar.policy.model import IPNetwork, PolicyMeta, Reason
from sidecar.policy.store import PolicyStore, Snapshot

DELETED_VERSION = "deleted"


class SourceState(StrEnum):
    PENDING = "pending"  # no good version yet
    LOADED = "loaded"
    DELETED = "deleted"  # had a good version, then went away


@dataclass(frozen=True, slots=True)
class SourceEntry:
    source: str
    state: SourceState = SourceState.PENDING
    policy: Policy | None = None  # the last good version
    rejected_version: str | None = None  # the newest version that failed validation, if any
    rejected_problem: str | None = None

    @property
    def version(self) -> str | None:
        return self.policy.meta.version if self.policy is not None else None


class PolicyAssembler:
    def __init__(
        self,
        sources: Sequence[str],
        store: PolicyStore,
        metrics: Metrics,
        extra_private_ranges: Iterable[IPNetwork] = (),
    ) -> None:
        if not sources:
            raise ValueError("a PolicyAssembler needs at least one source")
        if len(set(sources)) != len(sources):
            raise ValueError(f"duplicate policy sources: {list(sources)}")
        self.sources = tuple(sources)
        self.store = store
        self.metrics = metrics
        self.extra_private_ranges = tuple(extra_private_ranges)
        self._lock = threading.Lock()
        self._entries = {s: SourceEntry(s) for s in self.sources}

    # -- reads ----------------------------------------------------------------------------------

    def entry(self, source: str) -> SourceEntry:
        return self._entries[source]

    def entries(self) -> tuple[SourceEntry, ...]:
        return tuple(self._entries[s] for s in self.sources)

    @property
    def all_loaded_once(self) -> bool:
        """Every source had a good version at some point (deleted ones included)."""
        return all(e.state is not SourceState.PENDING for e in self._entries.values())

    # -- writes ---------------------------------------------------------------------------------

    def apply(self, policy: Policy) -> Snapshot:
        """A validated version of ``policy.meta.source`` becomes that source's current one."""
        source = policy.meta.source
        with self._lock:
            self._entries[source] = SourceEntry(source, SourceState.LOADED, policy)
            return self._publish()

    def reject(self, source: str, version: str, problem: str) -> None:
        """Remember a rejected version for status; the policy in force does not change."""
        with self._lock:
            old = self._entries[source]
            self._entries[source] = SourceEntry(source, old.state, old.policy, version, problem)

    def delete(self, source: str) -> Snapshot:
        with self._lock:
            old = self._entries[source]
            if old.state is SourceState.PENDING:
                return self.store.get()  # never loaded: nothing it allowed, nothing changes
            self._entries[source] = SourceEntry(source, SourceState.DELETED, old.policy)
            return self._publish()

    def _publish(self) -> Snapshot:
        entries = self.entries()
        if any(e.state is SourceState.PENDING for e in entries):
            return self.store.get()  # unavailable (policy not loaded) until every source loaded
        live = [e.policy for e in entries if e.state is SourceState.LOADED and e.policy]
        deleted = [e for e in entries if e.state is SourceState.DELETED]
        if not live:
            self.metrics.clear_policy_info()
            return self.store.set_unavailable(Reason.POLICY_DELETED)
        if not deleted:
            policy = self._union(live)
            self.metrics.set_policy_info(policy.meta.source, policy.meta.version)
            return self.store.set_policy(policy)
        everything = [e.policy for e in entries if e.policy is not None]
        union = self._union(everything, deleted={e.source for e in deleted})
        live_union = self._union(live)
        self.metrics.set_policy_info(union.meta.source, union.meta.version)
        return self.store.set_partial(union, live_union, [e.source for e in deleted])

    def _union(self, policies: Sequence[Policy], deleted: set[str] | None = None) -> Policy:
        if len(policies) == 1 and not deleted:
            policy = policies[0]
        else:
            policy = combine(policies, source=",".join(self.sources))
            if deleted:
                versions = [
                    DELETED_VERSION if p.meta.source in deleted else p.meta.version
                    for p in policies
                ]
                meta = PolicyMeta(policy.meta.source, ",".join(versions), policy.meta.mode)
                policy = Policy(meta, policy.allow_rules, policy.deny_rules, policy.private_ranges)
        if self.extra_private_ranges:
            policy = policy.with_extra_private_ranges(self.extra_private_ranges)
        return policy
