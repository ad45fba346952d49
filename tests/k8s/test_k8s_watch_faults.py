"""Corrupt watch events: the watch comes back at once, and a broken server is not hammered."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from sidecar.k8s.client import KubeClient
from sidecar.k8s.refs import ConfigMapRef
from sidecar.k8s.watch import ConfigMapObject, ConfigMapWatcher, WatchTuning
from tests.support.kubeapi import FakeKubeAPI, wait_until

REF = ConfigMapRef("shop", "egress-allowlist")
# The production backoff (first retry 0.1-0.2 s, cap 30 s); short watches are not needed here.
PRODUCTION = WatchTuning()

GARBAGE = {
    "not-json": b"<html>502 Bad Gateway</html>\n",
    "truncated": b'{"type":"MODIFIED","object":{"kind":"ConfigMap","metadata":{"name":"egress-al\n',
    "no-object": b'{"type":"MODIFIED"}\n',
    "object-not-a-map": b'{"type":"MODIFIED","object":"egress-allowlist"}\n',
    "not-an-object": b"[1, 2, 3]\n",
}


class Texts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[str | None] = []
        self.errors: list[str] = []

    def on_configmap(self, obj: ConfigMapObject) -> None:
        with self.lock:
            self.seen.append(obj.data.get("allowlist.yaml"))

    def on_absent(self, ref: ConfigMapRef, resource_version: str, *, deleted: bool) -> None:
        pass

    def on_connection(self, ref: ConfigMapRef, *, ok: bool, error: str | None) -> None:
        if not ok:
            with self.lock:
                self.errors.append(str(error))

    def texts(self) -> list[str | None]:
        with self.lock:
            return list(self.seen)


@pytest.fixture
def watcher(kube_client: KubeClient) -> Iterator[tuple[ConfigMapWatcher, Texts]]:
    texts = Texts()
    w = ConfigMapWatcher(kube_client, REF, texts, PRODUCTION, random.Random(3))
    w.start()
    yield w, texts
    w.stop()


def _healthy_watch_open(kubeapi: FakeKubeAPI, watcher: ConfigMapWatcher, count: int) -> None:
    """Watch number ``count`` is open and has delivered a bookmark (it works)."""
    wait_until(lambda: watcher.watches >= count and kubeapi.open_watches == 1, timeout=10)
    rv = kubeapi.resource_version
    wait_until(
        lambda: watcher.resource_version is not None and int(watcher.resource_version) >= rv,
        timeout=5,
    )
    time.sleep(0.3)  # a bookmark or two (every 0.2 s) arrived on this very watch


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_an_edit_right_after_a_corrupt_event_is_applied_within_2_s(
    kubeapi: FakeKubeAPI, watcher: tuple[ConfigMapWatcher, Texts], garbage: bytes
) -> None:
    w, texts = watcher
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v0"})
    wait_until(lambda: texts.texts() == ["v0"], timeout=10)
    # Corrupt events on watches that had been working: each is an isolated fault, and none may
    # push the next retry further out (they used to add up: 0.1, 0.2, 0.4, ... 3.2, 6.4 s).
    for n in range(1, 7):
        _healthy_watch_open(kubeapi, w, n)
        kubeapi.send_raw_watch_line(garbage)
        written = time.monotonic()
        kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": f"v{n}"})
        wait_until(lambda n=n: texts.texts()[-1] == f"v{n}", timeout=2)  # type: ignore[misc]
        assert time.monotonic() - written < 2
    assert texts.texts() == [f"v{n}" for n in range(7)]
    assert len(texts.errors) == 6 and all("corrupt watch event" in e for e in texts.errors)
    assert w.lists == 7  # each corrupt event: LIST again (what it carried is unknown)


def test_a_server_that_breaks_every_watch_at_once_gets_a_growing_backoff(
    kubeapi: FakeKubeAPI, kube_client: KubeClient
) -> None:
    """Lists succeed, but each watch gets garbage before anything else: the retries slow down
    (a successful LIST alone does not reset the backoff) instead of a tight list/watch loop."""
    kubeapi.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    texts = Texts()
    tuning = WatchTuning(backoff_initial=0.2, backoff_max=1.6)
    w = ConfigMapWatcher(kube_client, REF, texts, tuning, random.Random(5))
    stop = threading.Event()

    def break_every_watch() -> None:
        while not stop.is_set():
            if kubeapi.open_watches:
                kubeapi.send_raw_watch_line(b"garbage\n")
            time.sleep(0.005)

    breaker = threading.Thread(target=break_every_watch, daemon=True)
    breaker.start()
    w.start()
    try:
        time.sleep(4)
    finally:
        stop.set()
        w.stop()
        breaker.join(2)
    # Equal jitter, doubling from 0.2 s to the 1.6 s cap: 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6,
    # then 0.8-1.6 s each: at most ~8 attempts in 4 s; a reset on every LIST would make ~25+.
    assert 3 <= w.lists <= 9, w.lists
    assert texts.texts() == ["v1"]
