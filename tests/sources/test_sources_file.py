"""--allowlist-file hot reload, with updates done exactly as the kubelet updates a mounted
ConfigMap volume (AtomicWriter: timestamped directory, ``..data`` symlink swapped by rename)."""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sidecar.metrics import Metrics
from sidecar.policy.model import Destination, Reason, Verdict
from sidecar.policy.parse import digest
from sidecar.policy.store import PolicyStore
from sidecar.sources import SourceConfigError, SourceSpec, open_source
from sidecar.sources.file import FileSource
from tests.support.kubeapi import wait_until

DOC_1 = "allow:\n  - api.test\n"
DOC_2 = "allow:\n  - api.test\n  - cdn.test\n"
BAD = "allow:\n  - api.test\n  - '*'\n"


class AtomicWriter:
    """The kubelet's pkg/volume/util/atomic_writer.go, step by step."""

    DATA = "..data"

    def __init__(self, target: Path) -> None:
        self.target = target
        target.mkdir(parents=True, exist_ok=True)

    def write(self, payload: Mapping[str, str]) -> None:
        old = self.target / self.DATA
        old_dir = os.readlink(old) if old.is_symlink() else None
        # 1. the new payload in a fresh timestamped directory
        stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        ts_dir = self.target / (stamp + secrets.token_hex(5))
        ts_dir.mkdir(mode=0o755)
        for key, text in payload.items():
            (ts_dir / key).write_text(text)
        # 2. ..data_tmp -> the new directory (relative link); 3. rename it over ..data (atomic)
        tmp_link = self.target / "..data_tmp"
        os.symlink(ts_dir.name, tmp_link)
        os.rename(tmp_link, old)
        # 4. the user-visible key -> ..data/key links, created once
        for key in payload:
            visible = self.target / key
            if not visible.is_symlink():
                os.symlink(f"{self.DATA}/{key}", visible)
        # 5. the old timestamped directory goes
        if old_dir is not None:
            shutil.rmtree(self.target / old_dir)


def decide(store: PolicyStore, host: str) -> tuple[Verdict, Reason]:
    d = store.get().decide(Destination(host, 443))
    return d.verdict, d.reason


@pytest.fixture
def mounted(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> Iterator[tuple[AtomicWriter, FileSource, PolicyStore, Metrics]]:
    writer = AtomicWriter(tmp_path / "etc-egress")
    writer.write({"allowlist.yaml": DOC_1})
    store, metrics = PolicyStore(), Metrics()
    source = FileSource(
        str(writer.target / "allowlist.yaml"),
        store,
        metrics,
        interval=0.02,
        tracer_provider=spans[0],
    )
    source.start()
    yield writer, source, store, metrics
    source.stop()


def test_a_kubelet_style_update_is_picked_up(
    mounted: tuple[AtomicWriter, FileSource, PolicyStore, Metrics],
) -> None:
    writer, source, store, metrics = mounted
    assert source.ready()  # the first load is synchronous
    assert store.get().version == digest(DOC_1)
    assert decide(store, "cdn.test") == (Verdict.DENY, Reason.NO_MATCH)
    started = time.monotonic()
    writer.write({"allowlist.yaml": DOC_2})
    wait_until(lambda: store.get().version == digest(DOC_2), timeout=3)
    assert time.monotonic() - started < 1.0
    assert decide(store, "cdn.test") == (Verdict.ALLOW, Reason.MATCHED_ALLOW)
    assert 'result="applied"' in metrics.render().decode()


def test_an_invalid_file_keeps_the_last_good_version(
    mounted: tuple[AtomicWriter, FileSource, PolicyStore, Metrics],
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    writer, source, store, metrics = mounted
    writer.write({"allowlist.yaml": BAD})
    wait_until(lambda: source.status()["sources"][0]["rejected_version"] == digest(BAD))
    assert store.get().version == digest(DOC_1)
    assert decide(store, "api.test")[0] is Verdict.ALLOW
    text = metrics.render().decode()
    assert 'egress_policy_reloads_total{result="invalid",source="file:' in text

    # The span is reported right after the status changes: wait for it, don't race it.
    def failed_spans() -> list[Any]:
        return [
            s for s in spans[1].get_finished_spans() if s.status.status_code is StatusCode.ERROR
        ]

    wait_until(lambda: bool(failed_spans()))
    failed = failed_spans()
    assert len(failed) == 1 and (failed[0].attributes or {})["egress.policy.version"] == digest(BAD)
    writer.write({"allowlist.yaml": DOC_2})
    wait_until(lambda: store.get().version == digest(DOC_2))


def test_rewriting_the_same_text_is_not_a_reload(
    mounted: tuple[AtomicWriter, FileSource, PolicyStore, Metrics],
) -> None:
    writer, source, store, metrics = mounted
    before = store.get()
    checks = source.checks
    writer.write({"allowlist.yaml": DOC_1})  # new directory, new inode, same bytes
    wait_until(lambda: source.checks >= checks + 5)
    assert store.get() is before
    assert metrics.render().decode().count('result="applied"') == 1


def test_a_vanished_file_keeps_the_last_good_version(
    mounted: tuple[AtomicWriter, FileSource, PolicyStore, Metrics],
) -> None:
    writer, source, store, metrics = mounted
    (writer.target / "allowlist.yaml").unlink()
    wait_until(lambda: source.status()["sources"][0]["read_error"] is not None)
    assert decide(store, "api.test")[0] is Verdict.ALLOW
    assert 'result="error"' in metrics.render().decode()
    os.symlink("..data/allowlist.yaml", writer.target / "allowlist.yaml")
    writer.write({"allowlist.yaml": DOC_2})
    wait_until(lambda: store.get().version == digest(DOC_2))


def test_in_place_edits_are_picked_up_too(tmp_path: Path) -> None:
    path = tmp_path / "allowlist.yaml"
    path.write_text(DOC_1)
    store = PolicyStore()
    source = FileSource(str(path), store, Metrics(), interval=0.02)
    source.start()
    try:
        path.write_text(DOC_2)
        wait_until(lambda: store.get().version == digest(DOC_2))
    finally:
        source.stop()


def test_a_missing_file_at_start_fails_closed(tmp_path: Path) -> None:
    store = PolicyStore()
    source = FileSource(str(tmp_path / "nope.yaml"), store, Metrics(), interval=0.02)
    source.start()
    try:
        assert not source.ready()
        assert decide(store, "api.test") == (Verdict.DENY, Reason.POLICY_NOT_LOADED)
        (tmp_path / "nope.yaml").write_text(DOC_1)
        wait_until(source.ready)
    finally:
        source.stop()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SourceSpec(), "no policy source"),
        (SourceSpec(allowlist_file="x", configmaps=("a",)), "not both"),
        (SourceSpec(configmaps=("a/b/c",)), "more than one '/'"),
        (SourceSpec(configmaps=("Bad_Name",), kubeconfig=None), "namespace"),
        (SourceSpec(configmaps=("ns/ok",)), "not running in a pod"),
    ],
)
def test_open_source_rejects_unusable_options(spec: SourceSpec, message: str) -> None:
    with pytest.raises(SourceConfigError, match=message):
        open_source(spec, PolicyStore(), Metrics(), environ={})
