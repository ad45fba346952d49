"""Warning Events on the ConfigMap, through the sidecar's API client, against the test API server;
read back through the official client, as `kubectl describe` would."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from sidecar.k8s.client import KubeClient
from sidecar.k8s.events import (
    MAX_MESSAGE,
    EventRecorder,
    EventRequest,
    InvolvedObject,
    event_name,
    truncate_message,
)
from tests.support.kubeapi import FakeKubeAPI, wait_until

CM = InvolvedObject("ConfigMap", "v1", "shop", "egress-allowlist", "uid-1", "205")


def test_one_event_per_rejected_version_counted_across_sidecars(
    kubeapi: FakeKubeAPI, kube_client: KubeClient, tmp_path: Path
) -> None:
    kubeapi.event_verbs = {"create", "patch"}  # the sidecar's RBAC: no get, no list
    first = EventRecorder(kube_client, instance="web-1", host="node-a")
    second = EventRecorder(kube_client, instance="web-2", host="node-b")
    request = EventRequest(CM, "InvalidAllowlist", "allowlist.yaml line 3: bad")
    name = first.record(request)
    assert second.record(request) == name  # 409 AlreadyExists, then a patch
    (event,) = kubeapi.events_for("shop", "egress-allowlist")
    assert event["count"] == 2
    assert event["type"] == "Warning" and event["reason"] == "InvalidAllowlist"
    assert event["message"] == "allowlist.yaml line 3: bad"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "egress-allowlist",
        "namespace": "shop",
        "uid": "uid-1",
        "resourceVersion": "205",
    }
    assert event["source"] == {"component": "egress-sidecar", "host": "node-a"}
    assert event["reportingInstance"] == "web-1"
    assert event["metadata"]["namespace"] == "shop"
    patches = kubeapi.requests_matching(lambda r: r.method == "PATCH")
    assert patches and all(p.status == 200 for p in patches)
    assert kubeapi.requests_matching(lambda r: r.status == 403) == []
    assert third_count(kube_client, request, kubeapi) == 3
    # What `kubectl describe cm` reads: a core/v1 list of the namespace's Events, here through
    # the official client (the kube_client fixture's kubeconfig), which must decode ours.
    kubeapi.event_verbs = None
    official = k8s_config.new_client_from_config(config_file=str(tmp_path / "kubeconfig"))
    listed = k8s.CoreV1Api(official).list_namespaced_event("shop").items
    assert [(e.reason, e.count) for e in listed] == [("InvalidAllowlist", 3)]


def third_count(client: KubeClient, request: EventRequest, kubeapi: FakeKubeAPI) -> int:
    EventRecorder(client, instance="web-3").record(request)
    (event,) = kubeapi.events_for("shop", "egress-allowlist")
    return int(event["count"])


@pytest.mark.parametrize(
    ("other", "same"),
    [
        (InvolvedObject("ConfigMap", "v1", "shop", "egress-allowlist", "uid-1", "205"), True),
        (InvolvedObject("ConfigMap", "v1", "shop", "egress-allowlist", "uid-1", "206"), False),
        (InvolvedObject("ConfigMap", "v1", "shop", "egress-allowlist", "uid-2", "205"), False),
    ],
)
def test_event_names_follow_uid_and_version(other: InvolvedObject, same: bool) -> None:
    assert (event_name(CM, "InvalidAllowlist") == event_name(other, "InvalidAllowlist")) is same
    assert event_name(other, "InvalidAllowlist").startswith("egress-allowlist.")


@pytest.mark.parametrize("size", [0, 10, MAX_MESSAGE, MAX_MESSAGE + 1, 5000])
def test_messages_fit_the_api_limit(size: int) -> None:
    message = "é" * size
    out = truncate_message(message)
    assert len(out.encode()) <= MAX_MESSAGE
    assert (out == message) is (len(message.encode()) <= MAX_MESSAGE)


def test_the_background_recorder_posts_and_survives_refusals(
    kubeapi: FakeKubeAPI, kube_client: KubeClient
) -> None:
    recorder = EventRecorder(kube_client, instance="web-1")
    recorder.start()
    try:
        kubeapi.rotate_token("something-else")
        recorder.warn(CM, "InvalidAllowlist", "refused")
        wait_until(lambda: recorder.failed == 1)
        kubeapi.rotate_token("token-1")
        recorder.warn(CM, "InvalidAllowlist", "long " * 400)
        wait_until(lambda: recorder.posted == 1)
        (event,) = kubeapi.events_for("shop", "egress-allowlist")
        assert event["message"].endswith("...") and len(event["message"].encode()) <= 1024
    finally:
        recorder.stop()
