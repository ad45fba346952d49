"""Freed memory handed back to the kernel after a large, rare burst of allocation.

Loading a large allowlist (thousands of rules) allocates the YAML nodes and the problems list
of every rule, frees them, and leaves glibc holding the pages: a sidecar kept ~20 MiB more RSS
for as long as it ran. ``malloc_trim`` returns what the allocator can; musl has no such call
(nothing to do there), and ctypes is imported only when this is first needed.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

# Below this many rules the garbage of a load is too small to be worth a full collection.
LARGE_POLICY_RULES = 1000


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes  # only here: ~0.5 MiB, for sidecars that load large policies

    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_freed_memory() -> bool:
    """Collect cycles, then ask glibc to return free pages; True when it returned some."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
