"""The policy in force, swapped atomically.

A proxy flow takes one ``Snapshot`` and decides with it alone, so a request is never decided by a
mix of two versions. Swapping is a single reference assignment (atomic under the GIL); readers
never lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sidecar.policy.model import (
    Decision,
    Destination,
    IPAddress,
    Mode,
    PolicyMeta,
    Reason,
    Verdict,
)

if TYPE_CHECKING:
    from sidecar.policy.engine import Policy


# Without a policy there is nothing to audit against: these deny even in audit mode.
FAIL_CLOSED_REASONS = frozenset({Reason.POLICY_NOT_LOADED, Reason.POLICY_DELETED})


def apply_mode(decision: Decision, mode: Mode) -> Decision:
    """Audit mode turns a deny into ``audit``: decided, traced and logged, but let through."""
    if (
        mode is Mode.AUDIT
        and decision.verdict is Verdict.DENY
        and decision.reason not in FAIL_CLOSED_REASONS
    ):
        return replace(decision, verdict=Verdict.AUDIT)
    return decision


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view: the policy (or why there is none) and the mode to apply."""

    policy: Policy | None
    unavailable: Reason | None = Reason.POLICY_NOT_LOADED
    mode_override: Mode | None = None  # --mode / EGRESS_MODE; wins over the document's `mode:`
    # A union of several sources where some were deleted: ``policy`` is the union with the
    # deleted sources' last good versions (their deny rules stay in force: deleting never opens
    # anything), ``live`` the union of the sources still there. A call only a deleted source
    # allowed is denied with POLICY_DELETED until that source comes back.
    live: Policy | None = None
    deleted_sources: tuple[str, ...] = ()
    # Readings of this snapshot kept by its callers (sidecar.fastpath.vetting): a snapshot never
    # changes, so what was decided with it once stays decided. Bounded by its users.
    memo: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def meta(self) -> PolicyMeta | None:
        return self.policy.meta if self.policy is not None else None

    @property
    def mode(self) -> Mode:
        if self.mode_override is not None:
            return self.mode_override
        if self.policy is not None and self.policy.meta.mode is not None:
            return self.policy.meta.mode
        return Mode.ENFORCE

    @property
    def source(self) -> str:
        return self.policy.meta.source if self.policy is not None else ""

    @property
    def version(self) -> str:
        return self.policy.meta.version if self.policy is not None else ""

    def decide_raw(self, dest: Destination) -> Decision:
        """The policy's own decision, before the mode is applied."""
        if self.policy is None:
            return Decision(Verdict.DENY, self.unavailable or Reason.POLICY_NOT_LOADED)
        decision = self.policy.decide(dest)
        if not self.deleted_sources or not decision.permits:
            return decision
        live = self.live.decide(dest) if self.live is not None else None
        if live is not None and live.permits:
            return live
        return Decision(
            Verdict.DENY,
            Reason.POLICY_DELETED,
            decision.rule,
            detail=f"allowed only by {', '.join(self.deleted_sources)}, which was deleted",
        )

    def decide(self, dest: Destination) -> Decision:
        return apply_mode(self.decide_raw(dest), self.mode)

    def inspection(self, host: str | None, port: int) -> str | None:
        """The text of the ``inspect: true`` rule that makes HTTPS to ``host:port`` inspected
        (None: passthrough). Read from the whole union: a deleted source's rule still marks
        its hosts inspected, and their calls are then denied as the union says."""
        if self.policy is None or host is None:
            return None
        rule = self.policy.inspection(host, port)
        return rule.text if rule is not None else None

    def needs_address(self, dest: Destination, by_name: Decision) -> bool:
        """Whether resolving ``dest.host`` could change or confirm the by-name decision."""
        if self.policy is None:
            return False
        if self.deleted_sources:
            # ``by_name`` may be POLICY_DELETED, which neither union produced: ask each union
            # about its own by-name decision.
            if self.live is not None and self.live.needs_address(dest, self.live.decide(dest)):
                return True
            return self.policy.needs_address(dest, self.policy.decide(dest))
        return self.policy.needs_address(dest, by_name)

    def decide_resolved(
        self, dest: Destination, addresses: Sequence[IPAddress]
    ) -> tuple[Decision, IPAddress | None]:
        """Decide a named destination against each address it resolved to (in order).

        Returns the first permitting decision with the address the proxy must connect to (the
        vetted one: no second lookup), or the first address's deny with no address. The mode is
        not applied here; callers apply it to the returned decision.
        """
        first_deny: Decision | None = None
        for address in addresses:
            decision = self.decide_raw(replace(dest, address=address))
            if decision.permits:
                return decision, address
            first_deny = first_deny or decision
        if first_deny is None:
            return Decision(
                Verdict.DENY, Reason.UNRESOLVABLE, detail=f"{dest.host} has no address"
            ), None
        return first_deny, None


class PolicyStore:
    """Holds the current ``Snapshot``; writers replace it whole."""

    def __init__(self, mode_override: Mode | None = None) -> None:
        self._mode_override = mode_override
        self._snapshot = Snapshot(None, Reason.POLICY_NOT_LOADED, mode_override)

    def get(self) -> Snapshot:
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._snapshot.policy is not None

    def set_policy(self, policy: Policy) -> Snapshot:
        self._snapshot = Snapshot(policy, None, self._mode_override)
        return self._snapshot

    def set_partial(self, union: Policy, live: Policy | None, deleted: Sequence[str]) -> Snapshot:
        """Some sources of a union are deleted (see ``Snapshot.live``); ``deleted`` names them."""
        if not deleted:
            return self.set_policy(union)
        self._snapshot = Snapshot(union, None, self._mode_override, live, tuple(deleted))
        return self._snapshot

    def set_unavailable(self, reason: Reason) -> Snapshot:
        self._snapshot = Snapshot(None, reason, self._mode_override)
        return self._snapshot
