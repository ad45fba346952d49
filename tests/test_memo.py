"""sidecar.memo: a bounded memo never holds more than its limit and always keeps the newest."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.memo import remember


@given(st.lists(st.tuples(st.integers(0, 50), st.integers()), max_size=200), st.integers(1, 8))
def test_never_over_the_limit_and_the_newest_is_kept(
    puts: list[tuple[int, int]], limit: int
) -> None:
    memo: dict[int, int] = {}
    for key, value in puts:
        assert remember(memo, key, value, limit) == value
        assert len(memo) <= limit
        assert memo[key] == value


def test_a_full_memo_starts_over() -> None:
    memo = {1: "a", 2: "b"}
    remember(memo, 3, "c", 2)
    assert memo == {3: "c"}
    remember(memo, 3, "d", 2)  # a key already there still counts: one entry, replaced
    assert memo == {3: "d"}
