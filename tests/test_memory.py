"""sidecar.memory: the pages a large load freed go back to the kernel (glibc's malloc_trim),
measured in a process of its own."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.memory import LARGE_POLICY_RULES

REPO = Path(__file__).resolve().parents[1]

PROGRAM = """
from sidecar.memory import release_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

blocks = [bytes(1024) for _ in range(60_000)]  # ~60 MiB of glibc chunks
pins = blocks[::100]  # one block in a hundred kept: the heap's top cannot simply shrink
del blocks
before = rss_mib()
released = release_freed_memory()
print(before, rss_mib(), released)
"""


def test_freed_pages_are_returned_after_a_large_load() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    before, after, released = int(out[0]), int(out[1]), out[2]
    assert released == "True"
    assert before - after >= 30, (before, after)  # most of the ~60 MiB freed is given back


@pytest.mark.parametrize(("rules", "collected"), [(10, False), (LARGE_POLICY_RULES, True)])
def test_only_a_large_policy_pays_for_a_collection(rules: int, collected: bool) -> None:
    from sidecar.metrics import Metrics
    from sidecar.sources.reporting import ReloadReporter

    reporter = ReloadReporter(Metrics())
    full: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    was_enabled = gc.isenabled()
    gc.disable()  # only the collection asked for is seen
    gc.callbacks.append(seen)
    try:
        reporter.applied("file:test", "v1", previous=None, rules=rules)
    finally:
        gc.callbacks.remove(seen)
        if was_enabled:
            gc.enable()
    assert bool(full) is collected
