"""Every kustomization under config/ renders with `kubectl kustomize` and validates against the
Kubernetes schema; the webhook configuration, Deployment and RBAC say what docs/injector.md says."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.admission import ROUTES
from injector.certs import WEBHOOK_NAMES
from injector.config import SYSTEM_NAMESPACES, config_from_dict
from sidecar import contract as c
from sidecar.policy.parse import validate_text
from tests.injector.support import REPO, validate

CONFIG = REPO / "config"
KUSTOMIZATIONS = sorted(p.parent for p in CONFIG.rglob("kustomization.yaml"))
CRD_KINDS = {"Certificate", "Issuer"}  # cert-manager's: no schema in kubernetes-validate


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{directory}: {proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def test_all_kustomizations_are_found() -> None:
    names = {str(p.relative_to(CONFIG)) for p in KUSTOMIZATIONS}
    assert {
        ".",
        "base",
        "injector",
        "cert-manager",
        "sidecar-rbac",
        "default-allowlist",
        "inspect-ca-cert-manager",
    } <= names


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_renders_and_validates(directory: Path) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "cert-manager.io/v1"
            continue
        validate(doc)


def test_webhook_configuration() -> None:
    docs = render(CONFIG)
    hook = one(docs, "MutatingWebhookConfiguration")
    service = one(docs, "Service", "egress-injector")
    assert [w["name"] for w in hook["webhooks"]] == list(WEBHOOK_NAMES)
    excluded = SYSTEM_NAMESPACES | {"egress-system"}
    for webhook in hook["webhooks"]:
        assert webhook["sideEffects"] == "None"
        assert webhook["timeoutSeconds"] <= 5
        assert webhook["reinvocationPolicy"] == "IfNeeded"
        assert webhook["failurePolicy"] == "Fail"
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["matchConditions"]
        ref = webhook["clientConfig"]["service"]
        assert ref["path"] in ROUTES
        assert (ref["name"], ref["namespace"]) == (
            service["metadata"]["name"],
            service["metadata"]["namespace"],
        )
        assert ref["port"] == service["spec"]["ports"][0]["port"]
        expressions = webhook["namespaceSelector"]["matchExpressions"]
        by_name = next(e for e in expressions if e["key"] == "kubernetes.io/metadata.name")
        assert by_name["operator"] == "NotIn" and set(by_name["values"]) == excluded
        label = next(e for e in expressions if e["key"] == c.LABEL_INJECTION)
        assert "disabled" in label["values"] if label["operator"] == "NotIn" else True
    pods_ns, pods_annotation, workloads = hook["webhooks"]
    assert pods_ns["clientConfig"]["service"]["path"] == "/mutate/pods/namespace-enabled"
    assert pods_ns["namespaceSelector"]["matchExpressions"][0] == {
        "key": c.LABEL_INJECTION,
        "operator": "In",
        "values": ["enabled"],
    }
    assert pods_annotation["clientConfig"]["service"]["path"] == "/mutate/pods"
    assert workloads["clientConfig"]["service"]["path"] == "/mutate/workloads"
    resources = {r for rule in workloads["rules"] for r in rule["resources"]}
    assert resources == {"deployments", "statefulsets", "daemonsets", "jobs", "cronjobs"}
    for webhook in (pods_ns, pods_annotation):
        (rule,) = webhook["rules"]
        assert rule["operations"] == ["CREATE"] and rule["resources"] == ["pods"]


def test_injector_deployment_service_and_pdb() -> None:
    docs = render(CONFIG)
    deploy = one(docs, "Deployment", "egress-injector")
    pdb = one(docs, "PodDisruptionBudget", "egress-injector")
    service = one(docs, "Service", "egress-injector")
    cm = one(docs, "ConfigMap")
    assert deploy["spec"]["replicas"] == 2
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["egress-injector", "serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 8443
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "egress-injector-tls"
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    args = " ".join(container["args"])
    assert f"--config={mounts['config']}/config.yaml" in args
    assert f"--tls-cert={mounts['tls']}/tls.crt" in args
    # the shipped configuration is valid
    cfg = config_from_dict(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.injector_namespace == deploy["metadata"]["namespace"] == "egress-system"


def test_rbac_is_least_privilege() -> None:
    docs = render(CONFIG)
    kinds = [d["kind"] for d in docs]
    # the injector makes no API call: no Role, no binding, no token
    assert not {"Role", "RoleBinding", "ClusterRoleBinding"} & set(kinds)
    account = one(docs, "ServiceAccount", "egress-injector")
    assert account["automountServiceAccountToken"] is False
    role = one(docs, "ClusterRole", "egress-sidecar")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    configmaps = rules[(("",), ("configmaps",))]
    assert configmaps["verbs"] == ["list", "watch"]  # list-then-watch by name; no get
    assert configmaps["resourceNames"] == [c.DEFAULT_ALLOWLIST_CONFIGMAP]
    assert rules[(("",), ("events",))]["verbs"] == ["create", "patch"]  # core/v1 Events
    assert len(rules) == 2
    binding = one(render(CONFIG / "sidecar-rbac" / "namespace-binding"), "RoleBinding")
    assert binding["roleRef"]["name"] == "egress-sidecar"
    namespace = binding["metadata"]["namespace"]
    assert binding["subjects"][0]["name"] == f"system:serviceaccounts:{namespace}"


def test_injector_namespace_is_never_injected() -> None:
    namespace = one(render(CONFIG), "Namespace", "egress-system")
    assert namespace["metadata"]["labels"][c.LABEL_INJECTION] == "disabled"


def test_cert_manager_overlay() -> None:
    docs = render(CONFIG / "cert-manager")
    hook = one(docs, "MutatingWebhookConfiguration")
    cert = one(docs, "Certificate", "egress-injector")
    issuer = one(docs, "Issuer")
    ns = cert["metadata"]["namespace"]
    assert (
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/egress-injector"
    )
    assert cert["spec"]["secretName"] == "egress-injector-tls"
    assert cert["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    assert "egress-injector.egress-system.svc" in cert["spec"]["dnsNames"]


def test_inspection_ca_with_cert_manager() -> None:
    docs = render(CONFIG / "inspect-ca-cert-manager")
    cert = one(docs, "Certificate", c.INSPECT_CA_SECRET)
    issuer = one(docs, "Issuer")
    for doc in docs:
        assert "namespace" not in doc["metadata"]  # applied with -n <namespace>: one per namespace
    spec = cert["spec"]
    assert spec["isCA"] is True
    assert spec["secretName"] == c.INSPECT_CA_SECRET  # what the injector mounts
    assert spec["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}
    assert "selfSigned" in issuer["spec"]
    assert "cert sign" in spec["usages"]
    # renewals keep the key, so the bundles pods built at start keep verifying its leaves
    assert spec["privateKey"]["rotationPolicy"] == "Never"
    # the whole install does not make one: it is per namespace
    assert not [d for d in render(CONFIG) if d["metadata"]["name"] == c.INSPECT_CA_SECRET]


def test_default_allowlist_is_a_valid_policy() -> None:
    cm = one(render(CONFIG / "default-allowlist"), "ConfigMap", c.DEFAULT_ALLOWLIST_CONFIGMAP)
    assert "namespace" not in cm["metadata"]  # applied with -n <namespace>
    problems = validate_text(cm["data"][c.ALLOWLIST_KEY], source="default-allowlist")
    assert problems == []


def test_dockerfile_builds_one_non_root_image_with_both_commands() -> None:
    # The text only; tests/image builds the image and runs a pod from it (make image-test).
    text = (REPO / "Dockerfile").read_text()
    assert "FROM debian:trixie-slim" in text  # Debian's python3: what debootstrap reproduces
    assert "USER 1337:1337" in text
    for path in ("sidecar", "injector", "requirements.lock", "pyproject.toml"):
        assert f"COPY {path}" in text or f" {path} " in text, path
    assert "iptables" in text
    ignore = (REPO / ".dockerignore").read_text()
    assert "!injector/" in ignore and "!sidecar/" in ignore
