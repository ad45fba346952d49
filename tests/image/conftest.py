"""Fixtures for the pod-from-image tests (root, buildah, network namespaces, iptables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import netns as h


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def reaped() -> list[str]:
    """Namespaces of earlier, crashed runs are removed once per session."""
    return h.reap_stale()
