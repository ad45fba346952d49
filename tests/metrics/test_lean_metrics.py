"""The per-call metric kinds (sidecar.metrics.LeanHistogram, LeanCounter) expose exactly what
prometheus_client's Histogram and Counter expose for the same observations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sidecar.metrics import REQUEST_BUCKETS, LeanCounter, LeanHistogram

LABELS = st.sampled_from([("allow", "explicit"), ("deny", "transparent"), ("audit", "explicit")])
# Bucket bounds themselves (le is inclusive), values between, beyond the last bound, zero.
VALUES = st.one_of(
    st.sampled_from([0.0, *REQUEST_BUCKETS, 31.0, 1e6]),
    st.floats(min_value=0, max_value=100, allow_nan=False),
)


@given(st.lists(st.tuples(LABELS, VALUES), max_size=40))
def test_lean_histogram_text_is_prometheus_clients(
    observations: list[tuple[tuple[str, str], float]],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(
        "h_seconds", "doc", ["decision", "capture"], registry=theirs, buckets=REQUEST_BUCKETS
    )
    lean = LeanHistogram("h_seconds", "doc", ["decision", "capture"], REQUEST_BUCKETS, ours)
    for labels, value in observations:
        reference.labels(*labels).observe(value)
        lean.labels(*labels).observe(value)
    # prometheus_client orders series as first observed, as ours does; its _created lines are
    # disabled by sidecar.metrics (imported above).
    assert generate_latest(ours) == generate_latest(theirs)


@given(st.lists(st.tuples(LABELS, st.integers(min_value=1, max_value=10**6)), max_size=40))
def test_lean_counter_text_is_prometheus_clients(
    increments: list[tuple[tuple[str, str], int]],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("c", "doc", ["decision", "capture"], registry=theirs)
    lean = LeanCounter("c", "doc", ["decision", "capture"], ours)
    for labels, amount in increments:
        reference.labels(*labels).inc(amount)
        lean.labels(*labels).inc(amount)
    assert generate_latest(ours) == generate_latest(theirs)


def test_wrong_label_count_is_refused() -> None:
    lean = LeanHistogram("x", "doc", ["a", "b"], (1.0,), CollectorRegistry())
    with pytest.raises(ValueError, match=r"labels \('a', 'b'\)"):
        lean.labels("only-one")
