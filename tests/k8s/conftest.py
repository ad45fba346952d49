"""Fixtures for the Kubernetes adapters: a fake API server and a client configured for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.k8s.client import ClientOptions, KubeClient
from tests.support.kubeapi import FakeKubeAPI


@pytest.fixture
def kubeapi() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(bookmark_interval=0.2)
    api.start()
    yield api
    api.stop()


@pytest.fixture
def kube_client(kubeapi: FakeKubeAPI, tmp_path: Path) -> Iterator[KubeClient]:
    kubeconfig = kubeapi.write_kubeconfig(tmp_path / "kubeconfig", namespace="shop")
    client = KubeClient(ClientOptions(kubeconfig=str(kubeconfig)), environ={})
    yield client
    client.close()
