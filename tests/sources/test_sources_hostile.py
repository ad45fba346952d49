"""Hostile or oversized allowlist versions on the reload paths (file and ConfigMap): each is
refused quickly with bounded memory, the last good version stays, and the next good edit
applies."""

from __future__ import annotations

import logging
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.k8s.client import KubeClient
from sidecar.k8s.refs import ConfigMapRef
from sidecar.k8s.watch import WatchTuning
from sidecar.metrics import Metrics
from sidecar.policy.model import Destination, Verdict
from sidecar.policy.parse import digest
from sidecar.policy.store import PolicyStore
from sidecar.sources.configmap import ConfigMapSource
from sidecar.sources.file import FileSource
from tests.policy.hostile import laughs
from tests.support.kubeapi import FakeKubeAPI, wait_until

GOOD_1 = "allow:\n  - api.test\n"
GOOD_2 = "allow:\n  - api.test\n  - cdn.test\n"
HOSTILE = {
    "laughs-hosts": laughs("host"),
    "laughs-ports": laughs("ports"),
    "laughs-paths": laughs("paths"),
    "recursive": "allow: &a [*a]\n",
    "deep": "allow:\n" + "".join("  " * i + "- \n" for i in range(1, 200)),
}
# Refused within this time and this much memory allocated at the peak (tracemalloc).
MAX_SECONDS = 2.0
MAX_PEAK_BYTES = 40 * 1024 * 1024


def allows(store: PolicyStore, host: str) -> bool:
    return store.get().decide(Destination(host, 443)).verdict is Verdict.ALLOW


def measured(action: Callable[[], object], done: Callable[[], bool]) -> tuple[float, int]:
    """(seconds until ``done``, peak bytes allocated meanwhile, on every thread)."""
    tracemalloc.start()
    try:
        started = time.monotonic()
        action()
        wait_until(done, timeout=15)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return elapsed, peak


@pytest.fixture
def file_source(tmp_path: Path) -> Iterator[tuple[Path, FileSource, PolicyStore]]:
    path = tmp_path / "allowlist.yaml"
    path.write_text(GOOD_1)
    store = PolicyStore()
    source = FileSource(str(path), store, Metrics(), interval=0.02)
    source.start()
    yield path, source, store
    source.stop()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_file_source_refuses_a_hostile_version_then_applies_the_next_good_one(
    name: str, file_source: tuple[Path, FileSource, PolicyStore]
) -> None:
    path, source, store = file_source
    text = HOSTILE[name]
    elapsed, peak = measured(
        lambda: path.write_text(text),
        lambda: source.status()["sources"][0]["rejected_version"] == digest(text),
    )
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK_BYTES, (elapsed, peak)
    assert store.get().version == digest(GOOD_1) and allows(store, "api.test")
    path.write_text(GOOD_2)
    wait_until(lambda: store.get().version == digest(GOOD_2), timeout=MAX_SECONDS)
    assert allows(store, "cdn.test")


def test_file_source_does_not_read_a_file_over_the_size_limit(
    file_source: tuple[Path, FileSource, PolicyStore],
) -> None:
    path, source, store = file_source
    with path.open("w") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of NULs that must never be read
    elapsed, peak = measured(
        lambda: None,
        lambda: source.status()["sources"][0]["rejected_version"] == f"size:{64 * 1024 * 1024}",
    )
    assert elapsed < MAX_SECONDS and peak < 1024 * 1024, (elapsed, peak)
    assert "larger than the 1048576 bytes" in source.status()["sources"][0]["rejected_problem"]
    assert store.get().version == digest(GOOD_1)
    path.write_text(GOOD_2)
    wait_until(lambda: store.get().version == digest(GOOD_2), timeout=MAX_SECONDS)


def test_file_source_logs_the_warnings_of_an_accepted_version(
    file_source: tuple[Path, FileSource, PolicyStore], caplog: pytest.LogCaptureFixture
) -> None:
    path, _, store = file_source
    caplog.set_level(logging.WARNING, logger="sidecar.sources")
    wide = "allow:\n  - api.test\n  - 2.0.0.0/7\n"
    path.write_text(wide)
    wait_until(lambda: store.get().version == digest(wide))
    (record,) = [r for r in caplog.records if r.getMessage().startswith("allowlist warning")]
    assert "line 3: warning: 2.0.0.0/7 is very wide" in record.getMessage()
    assert record.version == digest(wide)  # type: ignore[attr-defined]


NS = "shop"
REF = ConfigMapRef(NS, "egress-allowlist")
FAST = WatchTuning(
    backoff_initial=0.05, backoff_max=0.3, watch_timeout_min=30, watch_timeout_max=60
)


@pytest.fixture
def configmap_source(
    kubeapi: FakeKubeAPI, kube_client: KubeClient
) -> Iterator[tuple[ConfigMapSource, PolicyStore]]:
    kubeapi.put_configmap(NS, REF.name, {"allowlist.yaml": GOOD_1})
    store = PolicyStore()
    source = ConfigMapSource((REF,), kube_client, store, Metrics(), tuning=FAST)
    source.start()
    wait_until(source.ready)
    yield source, store
    source.stop()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_configmap_source_refuses_a_hostile_version_then_applies_the_next_good_one(
    name: str, kubeapi: FakeKubeAPI, configmap_source: tuple[ConfigMapSource, PolicyStore]
) -> None:
    source, store = configmap_source
    good = store.get().version
    versions: list[str] = []
    elapsed, peak = measured(
        lambda: versions.append(
            kubeapi.put_configmap(NS, REF.name, {"allowlist.yaml": HOSTILE[name]})
        ),
        lambda: source.status()["sources"][0]["rejected_version"] == versions[0],
    )
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK_BYTES, (elapsed, peak)
    assert store.get().version == good and allows(store, "api.test")
    fixed = kubeapi.put_configmap(NS, REF.name, {"allowlist.yaml": GOOD_2})
    wait_until(lambda: store.get().version == fixed, timeout=MAX_SECONDS)
    assert allows(store, "cdn.test")


def test_configmap_source_logs_the_warnings_of_an_accepted_version(
    kubeapi: FakeKubeAPI,
    configmap_source: tuple[ConfigMapSource, PolicyStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, store = configmap_source
    caplog.set_level(logging.WARNING, logger="sidecar.sources")
    version = kubeapi.put_configmap(
        NS, REF.name, {"allowlist.yaml": "allow:\n  - api.test\n  - '*.github.io'\n"}
    )
    wait_until(lambda: store.get().version == version)
    (record,) = [r for r in caplog.records if r.getMessage().startswith("allowlist warning")]
    assert 'line 3: warning: "*.github.io"' in record.getMessage()
