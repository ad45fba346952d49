"""Client configuration: in-cluster over HTTPS with a rotating token, kubeconfig, namespaces."""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.k8s.client import (
    ENV_SERVICEACCOUNT_DIR,
    ClientOptions,
    KubeClient,
    KubeConfigError,
    default_namespace,
)
from sidecar.k8s.refs import ConfigMapRef
from sidecar.k8s.watch import ConfigMapWatcher, WatchTuning
from tests.k8s.test_k8s_watch import Listener
from tests.support.kubeapi import FakeKubeAPI, RecordedRequest, wait_until

REF = ConfigMapRef("shop", "egress-allowlist")


def write_atomically(path: Path, text: str) -> None:
    """As the kubelet updates a projected token: write aside, rename over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def tls_api(tmp_path: Path) -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(tls=True, workdir=tmp_path / "pki", token="token-1", bookmark_interval=0.2)
    api.start()
    yield api
    api.stop()


@pytest.fixture
def serviceaccount(tmp_path: Path, tls_api: FakeKubeAPI) -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    assert tls_api.ca_path is not None
    shutil.copy(tls_api.ca_path, sa / "ca.crt")
    (sa / "token").write_text("token-1")
    (sa / "namespace").write_text("shop\n")
    return sa


def in_cluster_env(api: FakeKubeAPI, sa: Path) -> dict[str, str]:
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        ENV_SERVICEACCOUNT_DIR: str(sa),
    }


def test_in_cluster_config_over_https_survives_a_token_rotation(
    tls_api: FakeKubeAPI, serviceaccount: Path
) -> None:
    env = in_cluster_env(tls_api, serviceaccount)
    client = KubeClient(ClientOptions(), env)
    assert client.mode == "in-cluster"
    assert client.host == f"https://127.0.0.1:{tls_api.port}"
    assert default_namespace(ClientOptions(), env) == "shop"
    tls_api.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v1"})
    listener = Listener()
    tuning = WatchTuning(backoff_initial=0.05, backoff_max=0.3, watch_timeout_min=30)
    watcher = ConfigMapWatcher(client, REF, listener, tuning, random.Random(1))
    watcher.start()
    try:
        wait_until(lambda: listener.texts() == ["v1"])
        # The kubelet rotates the token file and the old token stops being accepted; the server
        # restarts too, so that the next request must authenticate afresh.
        write_atomically(serviceaccount / "token", "token-2")
        tls_api.rotate_token("token-2")
        tls_api.restart()
        tls_api.put_configmap("shop", "egress-allowlist", {"allowlist.yaml": "v2"})
        wait_until(lambda: listener.texts() == ["v1", "v2"], timeout=5)
        after = [r.authorization for r in tls_api.requests if r.status == 200]
        assert after[-1] is not None and after[-1].lower() == "bearer token-2"
        assert len(tls_api.requests_matching(lambda r: r.status == 401)) <= 2
    finally:
        watcher.stop()
        client.close()


def test_the_client_rereads_the_token_file_when_it_is_due(
    tls_api: FakeKubeAPI, serviceaccount: Path
) -> None:
    """The token file is re-read once it is older than the refresh period (a minute, as
    client-go's); here the period is made due at once."""
    env = in_cluster_env(tls_api, serviceaccount)
    client = KubeClient(ClientOptions(), env)
    try:
        client.list_configmaps("shop")
        write_atomically(serviceaccount / "token", "token-2")
        tls_api.rotate_token("token-2", keep_old=True)
        token_file = client.access.token_file
        assert token_file is not None
        last = list_and_record(client, tls_api)
        assert last.authorization is not None
        assert last.authorization.lower() == "bearer token-1"  # not due yet (1 min)
        # The token is re-read once its expiry has passed; move that expiry to the past.
        token_file.expires_at = time.monotonic() - 1
        last = list_and_record(client, tls_api)
        assert last.authorization is not None and last.authorization.lower() == "bearer token-2"
    finally:
        client.close()


def list_and_record(client: KubeClient, api: FakeKubeAPI) -> RecordedRequest:
    """List, and the server's record of that request (made just after it answered)."""
    before = len(api.requests)
    client.list_configmaps("shop")
    wait_until(lambda: len(api.requests) > before)
    return api.requests[before]


def test_https_with_a_wrong_ca_fails_loudly(
    tls_api: FakeKubeAPI, serviceaccount: Path, tmp_path: Path
) -> None:
    other = FakeKubeAPI(tls=True, workdir=tmp_path / "other-pki")
    assert other.ca_path is not None
    shutil.copy(other.ca_path, serviceaccount / "ca.crt")
    client = KubeClient(ClientOptions(), in_cluster_env(tls_api, serviceaccount))
    try:
        with pytest.raises(Exception, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            client.list_configmaps("shop", timeout=(2, 2))
    finally:
        client.close()


def test_kubeconfig_over_https(tls_api: FakeKubeAPI, tmp_path: Path) -> None:
    kubeconfig = tls_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="dev")
    opts = ClientOptions(kubeconfig=str(kubeconfig))
    client = KubeClient(opts, environ={})
    try:
        assert client.mode == "kubeconfig"
        tls_api.put_configmap("dev", "x", {"a": "b"})
        items = client.list_configmaps("dev")["items"]
        assert [i["metadata"]["name"] for i in items] == ["x"]
    finally:
        client.close()
    assert default_namespace(opts, {}) == "dev"


@pytest.mark.parametrize(
    ("ns_file", "env", "kubeconfig_ns", "expected"),
    [
        ("from-file", {"POD_NAMESPACE": "from-env"}, "from-kubeconfig", "from-file"),
        ("", {"POD_NAMESPACE": "from-env"}, "from-kubeconfig", "from-env"),
        (None, {}, "from-kubeconfig", "from-kubeconfig"),
        (None, {}, None, None),
    ],
)
def test_default_namespace_order(
    tmp_path: Path,
    ns_file: str | None,
    env: dict[str, str],
    kubeconfig_ns: str | None,
    expected: str | None,
) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    if ns_file is not None:
        (sa / "namespace").write_text(ns_file)
    kubeconfig = None
    if kubeconfig_ns is not None:
        api = FakeKubeAPI()
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kc", namespace=kubeconfig_ns))
    opts = ClientOptions(kubeconfig=kubeconfig, serviceaccount_dir=str(sa))
    assert default_namespace(opts, env) == expected


@pytest.mark.parametrize(
    ("env", "opts", "message"),
    [
        ({}, ClientOptions(), "not running in a pod"),
        (
            {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1"},
            ClientOptions(serviceaccount_dir="/nonexistent"),
            "token file does not exist",
        ),
        ({}, ClientOptions(kubeconfig="/nonexistent/kubeconfig"), "/nonexistent/kubeconfig"),
    ],
)
def test_missing_configuration_is_a_clear_error(
    env: dict[str, str], opts: ClientOptions, message: str
) -> None:
    with pytest.raises(KubeConfigError, match=message):
        KubeClient(opts, env)


def test_a_token_file_missing_when_due_keeps_the_last_token(
    tls_api: FakeKubeAPI, serviceaccount: Path
) -> None:
    """Mid-rotation (or a mount hiccup) the file may be absent for a moment: the request goes
    out with the token we have instead of failing; the next due re-read picks the new one up."""
    client = KubeClient(ClientOptions(), in_cluster_env(tls_api, serviceaccount))
    token_file = client.access.token_file
    assert token_file is not None
    (serviceaccount / "token").unlink()
    token_file.expires_at = time.monotonic() - 1
    assert (list_and_record(client, tls_api).authorization or "").lower() == "bearer token-1"
    write_atomically(serviceaccount / "token", "token-2")
    tls_api.rotate_token("token-2")
    token_file.expires_at = time.monotonic() - 1
    assert (list_and_record(client, tls_api).authorization or "").lower() == "bearer token-2"
