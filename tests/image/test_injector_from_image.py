"""The injector from the image, as config/ deploys it: the Deployment's pod spec rendered with
`kubectl kustomize config/`, its one container started from the image (tests/image/runtime.py)
with the spec's command, user (the pod's 1337), a read-only root and no capabilities, the TLS
Secret from `egress-injector certs` and config/injector/config.yaml mounted read-only. The kubelet's
HTTPS readiness probe must pass, and an AdmissionReview over HTTPS must come back with the
sidecar injected from this very image.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.config import DEFAULT_IMAGE
from tests.image.runtime import ImagePodRunner, image_config, mounted_rootfs, started_ready
from tests.support import netns as h
from tests.support.netns import POD4

IMAGE = os.environ.get("EGRESS_IMAGE", DEFAULT_IMAGE)
REPO = Path(__file__).resolve().parents[2]
SERVICE_DNS = "egress-injector.egress-system.svc"


@dataclass
class Injector:
    runner: ImagePodRunner
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes]
    ca: Path
    output: Path


def _deployment_spec() -> dict[str, Any]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "config")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (deployment,) = [
        d
        for d in yaml.safe_load_all(proc.stdout)
        if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "egress-injector"
    ]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def injector(reaped: list[str]) -> Iterator[Injector]:
    config = image_config(IMAGE)
    image_env = dict(e.split("=", 1) for e in config.get("Env", []))
    spec = _deployment_spec()
    w = h.create_world()
    try:
        certs = w.workdir / "certs"
        subprocess.run(
            [sys.executable, "-m", "injector.cli", "certs", "--output-dir", str(certs)],
            capture_output=True,
            timeout=60,
            check=True,
        )
        tls = w.workdir / "secret-tls"
        tls.mkdir()
        for name in ("tls.crt", "tls.key"):
            shutil.copy(certs / name, tls / name)
            (tls / name).chmod(0o644)  # the Secret volume's defaultMode
        cfg = w.workdir / "configmap-config"
        cfg.mkdir()
        shutil.copy(REPO / "config" / "injector" / "config.yaml", cfg / "config.yaml")
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "egress-injector-tls"
        assert volumes["config"]["configMap"]["name"].startswith("egress-injector-config")
        sa = w.workdir / "serviceaccount"  # the pod opts out of the token; kept for the runner
        sa.mkdir()
        with mounted_rootfs(IMAGE, f"{w.pod.name}-injector") as root:
            runner = ImagePodRunner(
                w,
                spec,
                "egress-injector-5f7c9-abcde",
                "egress-system",
                "node-a",
                POD4,
                files={},
                service_account=sa,
                cluster_env={},
                image_env=image_env,
                image_user=config.get("User", ""),
                roots={"injector": root},
                provided={"tls": tls, "config": cfg},
            )
            out = w.workdir / "injector.out"
            proc, _ = started_ready(runner, "injector", out, 30, probe="readinessProbe")
            yield Injector(runner, spec, proc, certs / "ca.crt", out)
            w.pod.kill_all()
    finally:
        w.close()


def test_runs_as_the_specs_non_root_user_without_capabilities(injector: Injector) -> None:
    (container,) = injector.spec["containers"]
    assert container["image"] == IMAGE
    children = Path(f"/proc/{injector.proc.pid}/task/{injector.proc.pid}/children").read_text()
    status = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{int(children.split()[0])}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["1337"] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0


def test_an_admission_review_gets_the_sidecar_of_this_image(injector: Injector) -> None:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "annotations": {"egress-sidecar.io/inject": "true"},
        },
        "spec": {"containers": [{"name": "app", "image": "curl"}]},
    }
    uid = str(uuid.uuid4())
    review: dict[str, Any] = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
        },
    }
    # The API server's call: HTTPS to the Service name, verified against the webhook's CA.
    proc = injector.runner.world.pod.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(injector.ca),
            "--resolve",
            f"{SERVICE_DNS}:8443:{POD4}",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            f"https://{SERVICE_DNS}:8443/mutate/pods",
        ],
        input=json.dumps(review),
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    response = json.loads(proc.stdout)["response"]
    assert response["allowed"] is True and response["uid"] == uid
    patch = json.loads(base64.b64decode(response["patch"]))
    added: list[Any] = [
        op["value"] for op in patch if op["op"] == "add" and isinstance(op["value"], dict)
    ]
    added += [v for op in patch if isinstance(op.get("value"), list) for v in op["value"]]
    names = {c.get("name"): c.get("image") for c in added if isinstance(c, dict)}
    assert names.get("egress-sidecar") == IMAGE, patch
