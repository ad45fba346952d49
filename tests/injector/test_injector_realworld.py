"""The real-world manifests (written by other projects, kept verbatim) inject cleanly: outputs
validate against the Kubernetes schema, keep every original container, probe, volume and security
setting, and put the containers in the documented order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.mutate import TEMPLATE_PATHS, pod_template
from injector.offline import inject_text
from sidecar import contract as c
from tests.injector.support import K8S_VERSION, REAL_WORLD, config, validate

MANIFESTS = sorted(REAL_WORLD.glob("*.yaml"))
LEGACY = "k8s-docs-cronjob-legacy.yaml"
PROXY_NAMES = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") == "Pod":
        spec: dict[str, Any] = doc["spec"]
        return spec
    template = pod_template(doc)
    return None if template is None else dict(template["spec"])


def _without_proxy_env(container: dict[str, Any]) -> dict[str, Any]:
    out = dict(container)
    env = [e for e in out.get("env", []) if e["name"] not in PROXY_NAMES]
    if env:
        out["env"] = env
    else:
        out.pop("env", None)
    return out


def test_the_manifests_are_there() -> None:
    assert len(MANIFESTS) >= 6, f"expected the real-world manifests in {REAL_WORLD}"


@pytest.mark.parametrize("capture", ["transparent", "explicit"])
@pytest.mark.parametrize("style", ["native", "container"])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_real_world_manifest_injects_cleanly(path: Path, style: str, capture: str) -> None:
    cfg = config(style, default_capture=capture)
    text = path.read_text()
    output, report = inject_text(text, cfg)
    before = [d for d in yaml.safe_load_all(text) if d is not None]
    after = list(yaml.safe_load_all(output))
    assert len(after) == len(before)
    assert report.skipped == []
    if path.name == LEGACY:
        assert after == before
        assert len(report.unsupported) == 1
        assert "batch/v1beta1" in report.unsupported[0] and "'batch/v1'" in report.unsupported[0]
        return
    assert report.unsupported == []
    workloads = 0
    for old, new in zip(before, after, strict=True):
        validate(new, K8S_VERSION)
        old_spec = _pod_spec(old)
        if old_spec is None:
            assert new == old, f"{old.get('kind')} must pass through unchanged"
            continue
        workloads += 1
        new_spec = _pod_spec(new)
        assert new_spec is not None
        _check_spec(old_spec, new_spec, style, capture)
    assert workloads == len(report.injected) >= 1


def _check_spec(old: dict[str, Any], new: dict[str, Any], style: str, capture: str) -> None:
    old_init = old.get("initContainers", [])
    old_main = old["containers"]
    new_init = new.get("initContainers", [])
    new_main = new["containers"]
    injected_init = [c.INIT_CONTAINER] if capture == "transparent" else []
    if style == "native":
        injected_init.append(c.SIDECAR_CONTAINER)
        assert [x["name"] for x in new_main] == [x["name"] for x in old_main]
        user_main = new_main
    else:
        assert new_main[0]["name"] == c.SIDECAR_CONTAINER
        user_main = new_main[1:]
    assert [x["name"] for x in new_init] == injected_init + [x["name"] for x in old_init]
    user_init = new_init[len(injected_init) :]
    # every original container is kept whole: probes, mounts, security settings, resources...
    for before, after in zip(old_init + old_main, user_init + user_main, strict=True):
        assert _without_proxy_env(after) == before
        if capture == "explicit":
            names = {e["name"] for e in after.get("env", [])}
            assert names >= PROXY_NAMES
    # pod-level settings and volumes are kept; ours are added at the end
    for key, value in old.items():
        if key not in ("initContainers", "containers", "volumes"):
            assert new[key] == value, key
    assert new["volumes"][: len(old.get("volumes", []))] == old.get("volumes", [])
    sidecar = next(x for x in new_init + new_main if x["name"] == c.SIDECAR_CONTAINER)
    assert sidecar["securityContext"]["runAsUser"] == c.PROXY_UID
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    if capture == "transparent":
        init = new_init[0]
        assert init["securityContext"]["runAsNonRoot"] is False
        assert init["securityContext"]["capabilities"] == {
            "add": ["NET_ADMIN", "NET_RAW"],
            "drop": ["ALL"],
        }


def test_microservices_demo_keeps_pod_security_and_names_workloads() -> None:
    text = (REAL_WORLD / "microservices-demo.yaml").read_text()
    output, _ = inject_text(text, config())
    docs = [d for d in yaml.safe_load_all(output) if d.get("kind") == "Deployment"]
    assert len(docs) >= 10
    for doc in docs:
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        sidecar = spec["initContainers"][1]
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        assert env["EGRESS_WORKLOAD_KIND"] == "Deployment"
        assert env["EGRESS_WORKLOAD_NAME"] == doc["metadata"]["name"]
        # microservices-demo labels with app=..., not app.kubernetes.io/*: the workload name
        assert env["OTEL_SERVICE_NAME"] == doc["metadata"]["name"]
        assert f"k8s.deployment.name={doc['metadata']['name']}" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_user_native_sidecar_starts_after_ours() -> None:
    text = (REAL_WORLD / "k8s-docs-job-sidecar.yaml").read_text()
    output, _ = inject_text(text, config())
    (job,) = yaml.safe_load_all(output)
    init = job["spec"]["template"]["spec"]["initContainers"]
    assert [x["name"] for x in init] == [c.INIT_CONTAINER, c.SIDECAR_CONTAINER, "logshipper"]
    assert init[1]["restartPolicy"] == "Always"
    assert init[2]["restartPolicy"] == "Always"


def _run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_reports_the_legacy_cronjob_clearly() -> None:
    proc = _run_cli("inject", "-f", str(REAL_WORLD / LEGACY))
    assert proc.returncode == 0, proc.stderr
    assert "batch/v1beta1" in proc.stderr and "batch/v1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert yaml.safe_load(proc.stdout)["apiVersion"] == "batch/v1beta1"
    strict = _run_cli("inject", "--strict", "-f", str(REAL_WORLD / LEGACY))
    assert strict.returncode == 3


def test_cli_injects_all_real_world_files_from_stdin() -> None:
    text = "\n---\n".join(p.read_text() for p in MANIFESTS if p.name != LEGACY)
    proc = _run_cli("inject", "-f", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "DaemonSet", "Job", "Service"} <= kinds
    assert proc.stderr.count("injected: ") == sum(1 for d in docs if d["kind"] in TEMPLATE_PATHS)


def test_kubernetes_validate_cli_accepts_every_output(tmp_path: Path) -> None:
    files = []
    for path in MANIFESTS:
        if path.name == LEGACY:
            continue
        output, _ = inject_text(path.read_text(), config())
        target = tmp_path / path.name
        target.write_text(output)
        files.append(str(target))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run(
        [str(cli), "--strict", "--kubernetes-version", K8S_VERSION, "--quiet", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
