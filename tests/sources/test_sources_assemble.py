"""From per-source states to the snapshot in force: union, fail closed, deleted sources."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.metrics import Metrics
from sidecar.policy.model import Destination, Reason, Verdict
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import PolicyStore
from sidecar.sources.assemble import PolicyAssembler, SourceState

A, B = "configmap:shop/a", "configmap:shop/b"
DOC_A = "allow:\n  - only-a.test\n  - both.test\n  - blocked-by-b.test\n"
DOC_B = "allow:\n  - only-b.test\n  - both.test\ndeny:\n  - blocked-by-b.test\n"
HOSTS = ("only-a.test", "only-b.test", "both.test", "blocked-by-b.test", "nobody.test")


def decide(store: PolicyStore, host: str) -> tuple[Verdict, Reason]:
    decision = store.get().decide(Destination(host, 443))
    return decision.verdict, decision.reason


def make(sources: tuple[str, ...] = (A, B)) -> tuple[PolicyAssembler, PolicyStore, Metrics]:
    store, metrics = PolicyStore(), Metrics()
    return PolicyAssembler(sources, store, metrics), store, metrics


ALLOW = (Verdict.ALLOW, Reason.MATCHED_ALLOW)
NO_MATCH = (Verdict.DENY, Reason.NO_MATCH)
DENY_RULE = (Verdict.DENY, Reason.MATCHED_DENY)
NOT_LOADED = (Verdict.DENY, Reason.POLICY_NOT_LOADED)
DELETED = (Verdict.DENY, Reason.POLICY_DELETED)

# events applied in order, then the expected decision for each of HOSTS
CASES = [
    ([], [NOT_LOADED] * 5),
    ([("apply", A)], [NOT_LOADED] * 5),  # b never loaded: its deny rules are unknown
    ([("apply", A), ("apply", B)], [ALLOW, ALLOW, ALLOW, DENY_RULE, NO_MATCH]),
    (
        [("apply", A), ("apply", B), ("delete", B)],
        # only-b: only b allowed it; blocked-by-b: b's deny rule stays in force
        [ALLOW, DELETED, ALLOW, DENY_RULE, NO_MATCH],
    ),
    (
        [("apply", A), ("apply", B), ("delete", A)],
        [DELETED, ALLOW, ALLOW, DENY_RULE, NO_MATCH],
    ),
    ([("apply", A), ("apply", B), ("delete", A), ("delete", B)], [DELETED] * 5),
    (
        [("apply", A), ("apply", B), ("delete", B), ("apply", B)],
        [ALLOW, ALLOW, ALLOW, DENY_RULE, NO_MATCH],
    ),
    ([("delete", B), ("apply", A)], [NOT_LOADED] * 5),  # deleting a never-loaded one: nothing
]


@pytest.mark.parametrize(("events", "expected"), CASES)
def test_union_of_two_sources(
    events: list[tuple[str, str]], expected: list[tuple[Verdict, Reason]]
) -> None:
    assembler, store, _ = make()
    docs = {A: DOC_A, B: DOC_B}
    for n, (what, source) in enumerate(events):
        if what == "apply":
            assembler.apply(parse_allowlist(docs[source], source=source, version=str(100 + n)))
        else:
            assembler.delete(source)
    assert [decide(store, h) for h in HOSTS] == expected


def test_versions_and_metrics_name_every_source() -> None:
    assembler, store, metrics = make()
    assembler.apply(parse_allowlist(DOC_A, source=A, version="11"))
    assert not assembler.all_loaded_once and store.get().policy is None
    assembler.apply(parse_allowlist(DOC_B, source=B, version="12"))
    snap = store.get()
    assert (snap.source, snap.version) == (f"{A},{B}", "11,12")
    assert (
        f'egress_policy_info{{source="{A},{B}",version="11,12"}} 1.0' in metrics.render().decode()
    )
    assembler.delete(B)
    assert store.get().version == "11,deleted"
    assert assembler.entry(B).state is SourceState.DELETED
    assert assembler.all_loaded_once
    assembler.delete(A)
    assert store.get().policy is None and store.get().unavailable is Reason.POLICY_DELETED
    assert "egress_policy_loaded 0.0" in metrics.render().decode()


def test_a_rejected_version_changes_nothing_but_status() -> None:
    assembler, store, _ = make((A,))
    assembler.apply(parse_allowlist(DOC_A, source=A, version="5"))
    before = store.get()
    assembler.reject(A, "6", "line 2: bad")
    assert store.get() is before
    entry = assembler.entry(A)
    assert (entry.version, entry.rejected_version, entry.rejected_problem) == (
        "5",
        "6",
        "line 2: bad",
    )


def test_extra_private_ranges_apply_to_the_union() -> None:
    store, metrics = PolicyStore(), Metrics()
    assembler = PolicyAssembler([A], store, metrics, [ipaddress.ip_network("127.0.0.0/8")])
    assembler.apply(parse_allowlist("allow:\n  - local.test\n", source=A, version="1"))
    dest = Destination("local.test", 80, ipaddress.ip_address("127.0.0.1"))
    assert store.get().decide(dest).verdict is Verdict.ALLOW


def test_a_single_deleted_source_denies_everything_with_policy_deleted() -> None:
    assembler, store, _ = make((A,))
    assembler.apply(parse_allowlist(DOC_A, source=A, version="1"))
    assembler.delete(A)
    assert [decide(store, h) for h in HOSTS] == [DELETED] * 5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["apply", "delete"]), st.sampled_from([A, B])), max_size=8),
    st.sampled_from(HOSTS),
)
def test_deleting_never_allows_more(events: list[tuple[str, str]], host: str) -> None:
    """Whatever happened, a call permitted now is permitted by the union of the live sources."""
    assembler, store, _ = make()
    docs = {A: DOC_A, B: DOC_B}
    live: dict[str, bool] = {A: False, B: False}
    for n, (what, source) in enumerate(events):
        if what == "apply":
            assembler.apply(parse_allowlist(docs[source], source=source, version=str(n)))
            live[source] = True
        else:
            assembler.delete(source)
            live[source] = False
    if store.get().decide(Destination(host, 443)).permits:
        assert all(assembler.entry(s).state is not SourceState.PENDING for s in (A, B))
        allowed_by_live = [
            parse_allowlist(docs[s], source=s).decide(Destination(host, 443)).permits
            for s in (A, B)
            if live[s]
        ]
        assert any(allowed_by_live)
