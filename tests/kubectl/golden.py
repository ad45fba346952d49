"""Golden files for command outputs: times normalized (same width, so tables keep their
alignment); UPDATE_GOLDEN=1 rewrites them (review the diff before committing)."""

from __future__ import annotations

import os
import re
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def normalize(text: str) -> str:
    """Times as one fixed time, and this worker's upstream ports as the canonical ones (same
    width: tables keep their alignment)."""
    from tests.kubectl.world import CANONICAL_PORTS, PORTS

    for label, port in PORTS.items():
        if port != CANONICAL_PORTS[label]:
            text = re.sub(rf"(?<!\d){port}(?!\d)", str(CANONICAL_PORTS[label]), text)
    return _TIME.sub("2026-01-01T00:00:00Z", text)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    got = normalize(text)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(got, encoding="utf-8")
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1 and review it"
    assert got == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"
