"""Fixtures for the pod-from-image tests (root, buildah, network namespaces, iptables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image.runtime import reap_stale_roots
from tests.support import netns as h


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    h.mark_netns(items, Path(__file__).parent)


@pytest.fixture(scope="session")
def reaped() -> list[str]:
    """Namespaces and image root filesystems of earlier, crashed runs are removed once."""
    return h.reap_stale() + reap_stale_roots()
