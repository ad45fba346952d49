"""A Deployment through `egress-injector inject`, with what a kubelet would give the pod: the
fake API server, its service-account files and the in-cluster environment. Shared by the pod
tests on the host (tests/netns) and from the built image (tests/image)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.kubeapi import FakeKubeAPI


def deployment(namespace: str, pod_spec: Mapping[str, Any]) -> str:
    """An annotated Deployment "web" whose pod template has ``pod_spec``."""
    doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": namespace,
            "annotations": {"egress-sidecar.io/inject": "true"},
        },
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": dict(pod_spec)},
        },
    }
    return yaml.safe_dump(doc)


def inject(workdir: Path, manifest: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The pod spec `egress-injector inject` makes of ``manifest`` with ``config``."""
    cfg = workdir / "injector.yaml"
    cfg.write_text(yaml.safe_dump(dict(config)))
    source = workdir / "deployment.yaml"
    source.write_text(manifest)
    proc = subprocess.run(
        [sys.executable, "-m", "injector.cli", "inject", "-f", str(source), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (injected,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    spec: dict[str, Any] = injected["spec"]["template"]["spec"]
    return spec


def start_api(workdir: Path) -> FakeKubeAPI:
    api = FakeKubeAPI(tls=True, workdir=workdir / "kubeapi")
    api.start()
    return api


def service_account(workdir: Path, api: FakeKubeAPI, namespace: str) -> Path:
    """The files a kubelet mounts for the pod's service account (readable by any UID)."""
    sa = workdir / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("token-1")
    (sa / "namespace").write_text(namespace)
    assert api.ca_path is not None
    (sa / "ca.crt").write_bytes(api.ca_path.read_bytes())
    for f in sa.iterdir():
        f.chmod(0o644)
    return sa


def cluster_env(api: FakeKubeAPI) -> dict[str, str]:
    """The in-cluster environment pointing at ``api`` (reached on the pod's loopback)."""
    return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
