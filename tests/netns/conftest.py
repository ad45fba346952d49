"""Fixtures for the network-namespace tests (root, iproute2, iptables, util-linux)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import netns as h
from tests.support.netns import SIDECAR

APP_UID = 4242  # the app container's user: anything but the proxy's 1337


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    h.mark_netns(items, Path(__file__).parent)


@pytest.fixture(scope="session")
def reaped() -> list[str]:
    """Namespaces of earlier, crashed runs are removed once per session."""
    return h.reap_stale()


@pytest.fixture(scope="module")
def world(reaped: list[str]) -> Iterator[h.World]:
    w = h.create_world()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def fresh_world(reaped: list[str]) -> Iterator[h.World]:
    w = h.create_world()
    try:
        yield w
    finally:
        w.close()


def iptables(
    world: h.World, *args: str, uid: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`egress-sidecar iptables ARGS` in the pod namespace (as root: NET_ADMIN)."""
    return world.pod.run([*SIDECAR, "iptables", *args], uid=uid, timeout=30)


def save(world: h.World, family: str, backend: str = "nft") -> str:
    tool = {"ipv4": "iptables", "ipv6": "ip6tables"}[family]
    return world.pod.ok([f"{tool}-{backend}-save"])


def split_print(text: str) -> dict[str, str]:
    """`iptables print` output → restore text per family (``ipv4``/``ipv6``)."""
    parts: dict[str, str] = {}
    current = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("# ipv4:") or line.startswith("# ipv6:"):
            current = line[2:6]
            parts[current] = ""
        elif current:
            parts[current] += line
    return parts
