"""Golden files: annotated inputs -> injected outputs, for every capture mode, sidecar style and
kind. Regenerate with ``UPDATE_GOLDEN=1 pytest tests/injector/test_injector_golden.py`` and review
the diff by eye."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.mutate import (
    BUNDLE_DIR,
    CA_CERT_DIR,
    CA_VOLUME,
    TRUST_ENV,
    pod_template,
)
from injector.offline import inject_text
from sidecar import contract as c
from tests.injector.support import (
    GOLDEN,
    K8S_VERSION,
    K8S_VERSION_OLD,
    UPDATE_GOLDEN,
    ca_key_exposures,
    config,
    validate,
)

INPUTS = sorted((GOLDEN / "input").glob("*.yaml"))
STYLES = ("native", "container")


def test_every_kind_and_capture_has_an_input() -> None:
    names = {p.stem for p in INPUTS}
    for kind in ("pod", "deployment", "statefulset", "daemonset", "job", "cronjob"):
        for capture in ("transparent", "explicit"):
            assert f"{kind}-{capture}" in names


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_golden(source: Path, style: str) -> None:
    output, report = inject_text(source.read_text(), config(style), namespace_injection=None)
    assert len(report.injected) == 1, report
    target = GOLDEN / "output" / f"{source.stem}.{style}.yaml"
    # what `inject` prints as warning: lines, reviewed like the manifests
    warnings = GOLDEN / "output" / f"{source.stem}.{style}.warnings.txt"
    warned = "".join(f"{w}\n" for w in report.warnings)
    if UPDATE_GOLDEN:
        target.write_text(output)
        warnings.write_text(warned)
    for path, got in ((target, output), (warnings, warned)):
        assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
        assert got == path.read_text(), f"{path} differs; review, then UPDATE_GOLDEN=1"
    for doc in yaml.safe_load_all(output):
        validate(doc, K8S_VERSION)
        if style == "container":
            validate(doc, K8S_VERSION_OLD)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_golden_is_a_fixed_point(source: Path, style: str) -> None:
    once, _ = inject_text(source.read_text(), config(style), namespace_injection=None)
    twice, report = inject_text(once, config(style), namespace_injection=None)
    assert twice == once
    assert report.injected == []
    assert all("already injected" in s for s in report.skipped)


def test_inspection_has_inputs_in_both_captures() -> None:
    names = {p.stem for p in INPUTS}
    assert {"pod-inspect-transparent", "deployment-inspect-explicit"} <= names


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc
    template = pod_template(doc)
    assert isinstance(template, dict)
    return template


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_the_ca_key_reaches_the_sidecar_alone(source: Path, style: str) -> None:
    """Walks every container of each reviewed output: no container but the sidecar has a way to
    the Secret's tls.key; with inspection every app and user init container has the CA
    certificate, the bundle and the variables, and without it nothing of the CA is there."""
    output = (GOLDEN / "output" / f"{source.stem}.{style}.yaml").read_text()
    for doc in yaml.safe_load_all(output):
        pod = _pod(doc)
        spec = pod["spec"]
        assert ca_key_exposures(spec) == []
        status = json.loads(pod["metadata"]["annotations"][c.ANNOTATION_STATUS])
        inspecting = status.get("inspectCA") is True
        assert inspecting == ("inspect" in source.stem)
        everything = (spec.get("initContainers") or []) + spec["containers"]
        (sidecar,) = [x for x in everything if x["name"] == c.SIDECAR_CONTAINER]
        apps = [x for x in everything if not x["name"].startswith("egress-")]
        assert apps
        secret_volumes = [
            v for v in spec.get("volumes") or [] if "egress-ca" in json.dumps(v.get("secret"))
        ]
        if not inspecting:
            assert secret_volumes == []
            assert c.ENV_INSPECT_CA_DIR not in json.dumps(sidecar)
            assert all(var not in json.dumps(x) for x in apps for var, _ in TRUST_ENV)
            continue
        whole = [v for v in secret_volumes if "items" not in v["secret"]]
        assert [v["name"] for v in whole] == [CA_VOLUME]
        holders = [
            x["name"]
            for x in everything
            if any(m["name"] == CA_VOLUME for m in x.get("volumeMounts") or [])
        ]
        assert holders == [c.SIDECAR_CONTAINER]
        (ca_mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == CA_VOLUME]
        assert ca_mount == {"name": CA_VOLUME, "mountPath": c.INSPECT_CA_DIR, "readOnly": True}
        assert {"name": c.ENV_INSPECT_CA_DIR, "value": c.INSPECT_CA_DIR} in sidecar["env"]
        for app in apps:
            mounts = {m["mountPath"]: m for m in app["volumeMounts"]}
            assert mounts[CA_CERT_DIR]["readOnly"] and mounts[BUNDLE_DIR]["readOnly"]
            names = {e["name"] for e in app["env"]}
            assert {var for var, _ in TRUST_ENV} <= names


def test_the_key_check_finds_each_way_to_the_key() -> None:
    """The walker above is only worth something if it fails: every way in is found."""
    spec: dict[str, Any] = {
        "containers": [
            {"name": "app", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}
        ],
        "initContainers": [{"name": c.SIDECAR_CONTAINER, "image": "x"}],
    }
    cert_only = {"secretName": "egress-ca", "items": [{"key": "tls.crt", "path": "ca.crt"}]}
    ways: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"name": "v", "secret": {"secretName": "egress-ca"}}, {}),
        (
            {
                "name": "v",
                "secret": {"secretName": "egress-ca", "items": [{"key": "tls.key", "path": "k"}]},
            },
            {},
        ),
        ({"name": "v", "projected": {"sources": [{"secret": {"name": "egress-ca"}}]}}, {}),
        (
            {"name": "v", "emptyDir": {}},
            {
                "env": [
                    {
                        "name": "K",
                        "valueFrom": {"secretKeyRef": {"name": "egress-ca", "key": "tls.key"}},
                    }
                ]
            },
        ),
        ({"name": "v", "emptyDir": {}}, {"envFrom": [{"secretRef": {"name": "egress-ca"}}]}),
    ]
    for volume, extra in ways:
        bad = copy.deepcopy(spec)
        bad["volumes"] = [volume]
        bad["containers"][0].update(extra)
        assert ca_key_exposures(bad), (volume, extra)
    fine = copy.deepcopy(spec)
    fine["volumes"] = [{"name": "v", "secret": cert_only}]
    assert ca_key_exposures(fine) == []
    fine["containers"][0]["volumeMounts"] = []
    fine["initContainers"][0]["volumeMounts"] = [{"name": "v", "mountPath": "/v"}]
    fine["volumes"] = [{"name": "v", "secret": {"secretName": "egress-ca"}}]
    assert ca_key_exposures(fine) == []  # the sidecar may hold it
