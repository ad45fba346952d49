"""The ConfigMap list/watch loop against the test API server, through the official client."""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.k8s.client import ClientOptions, KubeClient
from sidecar.k8s.refs import ConfigMapRef
from sidecar.k8s.watch import Backoff, ConfigMapObject, ConfigMapWatcher, WatchTuning
from tests.support.kubeapi import FakeKubeAPI, wait_until

REF = ConfigMapRef("shop", "egress-allowlist")
FAST = WatchTuning(
    backoff_initial=0.05,
    backoff_max=0.4,
    watch_timeout_min=30,
    watch_timeout_max=30,
    connect_timeout=2,
    read_grace=5,
    list_timeout=5,
)


@dataclass
class Listener:
    seen: list[tuple[Any, ...]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_configmap(self, obj: ConfigMapObject) -> None:
        with self.lock:
            self.seen.append(("cm", obj.resource_version, obj.data.get("allowlist.yaml"), obj.uid))

    def on_absent(self, ref: ConfigMapRef, resource_version: str, *, deleted: bool) -> None:
        with self.lock:
            self.seen.append(("absent", resource_version, deleted))

    def on_connection(self, ref: ConfigMapRef, *, ok: bool, error: str | None) -> None:
        with self.lock:
            self.seen.append(("conn", ok, error))

    def changes(self) -> list[tuple[Any, ...]]:
        with self.lock:
            return [s for s in self.seen if s[0] != "conn"]

    def errors(self) -> list[str]:
        with self.lock:
            return [str(s[2]) for s in self.seen if s[0] == "conn" and not s[1]]

    def texts(self) -> list[str | None]:
        return [c[2] for c in self.changes() if c[0] == "cm"]


@pytest.fixture
def run_watcher(
    kube_client: KubeClient,
) -> Iterator[Callable[..., tuple[ConfigMapWatcher, Listener]]]:
    started: list[ConfigMapWatcher] = []

    def run(
        ref: ConfigMapRef = REF, tuning: WatchTuning = FAST
    ) -> tuple[ConfigMapWatcher, Listener]:
        listener = Listener()
        watcher = ConfigMapWatcher(kube_client, ref, listener, tuning, random.Random(7))
        watcher.start()
        started.append(watcher)
        return watcher, listener

    yield run
    for watcher in started:
        watcher.stop()


def test_lists_then_watches_by_name_with_bookmarks(
    kubeapi: FakeKubeAPI, run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]]
) -> None:
    rv1 = kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    kubeapi.put_configmap("shop", "other", {"allowlist.yaml": "not ours"})
    watcher, listener = run_watcher()
    wait_until(lambda: listener.texts() == ["v1"])
    rv2 = kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})
    kubeapi.put_configmap("shop", "other", {"allowlist.yaml": "still not ours"})
    wait_until(lambda: listener.texts() == ["v1", "v2"])
    assert listener.changes()[0][1] == rv1 and listener.changes()[1][1] == rv2
    reads = kubeapi.requests_matching(lambda r: r.path.endswith("/configmaps"))
    assert reads and all(
        r.query.get("fieldSelector") == "metadata.name=egress-allowlist" for r in reads
    )
    watches = [r for r in reads if r.query.get("watch") == "true"]
    assert watches[0].query["allowWatchBookmarks"] == "true"
    assert watches[0].query["resourceVersion"] == str(int(rv1) + 1)  # the list's version
    # Bookmarks move the resume point past versions of other objects.
    last = kubeapi.put_configmap("shop", "other", {"allowlist.yaml": "x"})
    wait_until(
        lambda: watcher.resource_version is not None and int(watcher.resource_version) >= int(last)
    )


def test_a_watch_that_times_out_resumes_without_a_new_list(
    kubeapi: FakeKubeAPI, run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]]
) -> None:
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    tuning = WatchTuning(
        backoff_initial=0.05, backoff_max=0.4, watch_timeout_min=1, watch_timeout_max=1
    )
    watcher, listener = run_watcher(tuning=tuning)
    wait_until(lambda: watcher.watches >= 3, timeout=6)
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})
    wait_until(lambda: listener.texts() == ["v1", "v2"])
    assert watcher.lists == 1
    timeouts = {
        r.query.get("timeoutSeconds")
        for r in kubeapi.requests_matching(lambda r: r.query.get("watch") == "true")
    }
    assert timeouts == {"1"}
    assert listener.errors() == []


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_410_gone_relists_and_resumes(
    kubeapi: FakeKubeAPI,
    run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]],
    gone_as_http: bool,
) -> None:
    kubeapi.gone_as_http = gone_as_http
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    watcher, listener = run_watcher()
    wait_until(lambda: listener.texts() == ["v1"] and watcher.watches >= 1)
    # The server goes away; while it is down the ConfigMap changes and history is compacted,
    # so the watch cannot resume from where it was: it must LIST again.
    kubeapi.stop()
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})
    kubeapi.expire_history()
    kubeapi.start()
    wait_until(lambda: listener.texts() == ["v1", "v2"], timeout=5)
    assert watcher.lists == 2
    gone = kubeapi.requests_matching(lambda r: r.status == 410)
    assert bool(gone) is gone_as_http  # the HTTP form; the event form answers 200
    # An ERROR 410 in the middle of an open watch relists as well.
    wait_until(lambda: kubeapi.open_watches == 1)
    lists = watcher.lists
    kubeapi.expire_history()
    wait_until(lambda: watcher.lists == lists + 1)
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v3"})
    wait_until(lambda: listener.texts() == ["v1", "v2", "v3"])


def test_an_api_server_restart_mid_watch_loses_no_edit(
    kubeapi: FakeKubeAPI, run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]]
) -> None:
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    watcher, listener = run_watcher()
    wait_until(lambda: listener.texts() == ["v1"] and watcher.watches >= 1)
    kubeapi.stop()
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})  # while down
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v3"})
    time.sleep(0.3)  # a few refused reconnects
    kubeapi.start()
    wait_until(lambda: listener.texts() == ["v1", "v2", "v3"], timeout=5)
    assert watcher.lists == 1  # resumed from its version: the history was still there
    assert any("Connection" in e or "connect" in e for e in listener.errors())
    ok_after = listener.seen[-1]
    assert ok_after[0] in ("cm", "conn")


def test_delete_and_recreate_are_reported(
    kubeapi: FakeKubeAPI, run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]]
) -> None:
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    _, listener = run_watcher()
    wait_until(lambda: listener.texts() == ["v1"])
    gone_rv = kubeapi.delete_configmap("shop", "egress-allowlist")
    wait_until(lambda: ("absent", gone_rv, True) in listener.changes())
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})
    wait_until(lambda: listener.texts() == ["v1", "v2"])
    uids = [c[3] for c in listener.changes() if c[0] == "cm"]
    assert uids[0] != uids[1]


def test_a_configmap_missing_at_start_is_reported_absent_then_found(
    kubeapi: FakeKubeAPI, run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]]
) -> None:
    _, listener = run_watcher()
    wait_until(lambda: listener.changes() and listener.changes()[0][0] == "absent")
    assert listener.changes()[0][2] is False  # listed absent, not seen deleted
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    wait_until(lambda: listener.texts() == ["v1"])


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda api: setattr(api, "allowed_configmaps", {("shop", "someone-else")}), "HTTP 403"),
        (lambda api: api.rotate_token("not-the-clients"), "HTTP 401"),
    ],
    ids=["forbidden", "unauthorized"],
)
def test_refused_requests_back_off_and_recover(
    kubeapi: FakeKubeAPI,
    run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]],
    setup: Callable[[FakeKubeAPI], None],
    expected: str,
) -> None:
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    setup(kubeapi)
    _, listener = run_watcher()
    wait_until(lambda: len(listener.errors()) >= 3)
    assert all(e.startswith(expected) for e in listener.errors())
    assert listener.texts() == []
    # Backoff: the attempts slow down instead of hammering the server.
    assert len(kubeapi.requests) < 40
    kubeapi.allowed_configmaps = None
    kubeapi.rotate_token("token-1")
    wait_until(lambda: listener.texts() == ["v1"], timeout=5)


def test_rbac_by_name_is_enough() -> None:
    """With RBAC limited to the named ConfigMap, list and watch still work (field selector)."""
    with FakeKubeAPI(allowed_configmaps={("shop", "egress-allowlist")}, token=None) as api:
        api.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = api.write_kubeconfig(Path(tmp) / "kc", token="unused")
            client = KubeClient(ClientOptions(kubeconfig=str(kubeconfig)), environ={})
            listener = Listener()
            watcher = ConfigMapWatcher(client, REF, listener, FAST)
            watcher.start()
            try:
                wait_until(lambda: listener.texts() == ["v1"])
                api.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})
                wait_until(lambda: listener.texts() == ["v1", "v2"])
                assert listener.errors() == []
            finally:
                watcher.stop()
                client.close()


def test_stop_ends_a_blocked_watch_promptly(
    kubeapi: FakeKubeAPI, run_watcher: Callable[..., tuple[ConfigMapWatcher, Listener]]
) -> None:
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    watcher, listener = run_watcher()
    wait_until(lambda: listener.texts() == ["v1"] and watcher.watches >= 1)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 2
    assert watcher._thread is not None and not watcher._thread.is_alive()


@pytest.mark.parametrize("seed", range(5))
def test_backoff_is_capped_exponential_with_jitter(seed: int) -> None:
    backoff = Backoff(0.2, 5.0, random.Random(seed))
    delays = [backoff.next_delay() for _ in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(5.0, 0.2 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 5.0 and delays[-1] >= 2.5
    backoff.reset()
    assert backoff.next_delay() <= 0.2
