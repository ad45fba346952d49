"""Bounded memos for the hot path: readings of what the app sends, kept by their input.

One rule for all of them: a full memo starts over (cheaper per call than LRU bookkeeping, and a
pod's few destinations refill it at once), and a key longer than the caller's bound is read each
time and never kept, since the app chooses it (kept, thousands of 8-16 KiB heads would hold tens
of MiB).
"""

from __future__ import annotations

from collections.abc import Hashable


def remember[K: Hashable, V](memo: dict[K, V], key: K, value: V, limit: int) -> V:
    """Keep ``value`` under ``key`` (``memo`` cleared first when it holds ``limit``); returns
    ``value``. The caller decides whether ``key`` is short enough to keep."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value
