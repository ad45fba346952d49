"""Property tests: random pod specs never make the webhook fail or produce an invalid patch."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.admission import review
from injector.mutate import (
    BUNDLE_DIR,
    CA_CERT_DIR,
    TRUST_ENV,
    PodContext,
    inject_pod,
    sync_workload_annotations,
)
from sidecar import contract as c
from tests.injector.strategies import (
    ANNOTATION_KEYS,
    ANNOTATION_VALUES,
    ANY_JSON,
    valid_pods,
    weird_pods,
)
from tests.injector.support import ca_key_exposures, config, validate

CFG = config()


def admission_review(obj: Any, namespace: str = "shop") -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "object": obj,
            },
        }
    ).encode()


def applied(obj: Any, response: dict[str, Any]) -> Any:
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(obj), patch)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_pods())
def test_valid_pods_get_a_valid_patch_equal_to_the_pure_result(pod: dict[str, Any]) -> None:
    for route, injection in (("pods", None), ("pods-namespace-enabled", "enabled")):
        result = review(admission_review(pod), route, CFG)  # type: ignore[arg-type]
        response = result.response["response"]
        assert response["allowed"] is True
        assert result.outcome in ("injected", "skipped"), result.log
        expected = inject_pod(pod, PodContext("shop", injection), CFG)  # type: ignore[arg-type]
        assert applied(pod, response) == expected.pod
        assert ("patch" in response) is expected.injected
        if expected.injected:
            validate(expected.pod)
            again = review(admission_review(expected.pod), route, CFG)  # type: ignore[arg-type]
            assert "patch" not in again.response["response"]  # idempotent


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_pods(), st.sampled_from([None, "true", "false"]))
def test_the_ca_key_never_reaches_an_app_container(
    pod: dict[str, Any], inspect: str | None
) -> None:
    """Any pod, inspecting or not, through the webhook: no container but the sidecar can read
    the CA key; an inspecting pod's every app container gets the certificate and the bundle."""
    annotations = pod["metadata"].setdefault("annotations", {})
    annotations.pop(c.ANNOTATION_INSPECT_CA, None)
    if inspect is not None:
        annotations[c.ANNOTATION_INSPECT_CA] = inspect
    result = review(admission_review(pod), "pods", CFG)
    response = result.response["response"]
    assert response["allowed"] is True
    out = applied(pod, response)
    assert out == inject_pod(pod, PodContext("shop"), CFG).pod
    spec = out["spec"]
    assert ca_key_exposures(spec) == []
    if "patch" not in response:
        return
    validate(out)
    apps = [
        x
        for x in (spec.get("initContainers") or []) + spec["containers"]
        if not x["name"].startswith("egress-")
    ]
    for app in apps:
        names = {e["name"] for e in app.get("env") or []}
        paths = {m["mountPath"] for m in app.get("volumeMounts") or []}
        if inspect == "true":
            assert {var for var, _ in TRUST_ENV} <= names
            assert {CA_CERT_DIR, BUNDLE_DIR} <= paths
        else:
            assert not {CA_CERT_DIR, BUNDLE_DIR} & paths
    assert ("egress-ca" in json.dumps(spec)) is (inspect == "true")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weird_pods())
def test_anything_is_answered_allowed(obj: Any) -> None:
    result = review(admission_review(obj), "pods-namespace-enabled", CFG)
    response = result.response["response"]
    assert response["allowed"] is True
    assert not result.log["reason"].startswith("internal error"), result.log
    patched = applied(obj, response)  # a patch, if any, applies to what was sent
    if "patch" in response:
        assert patched["metadata"]["annotations"]["egress-sidecar.io/status"]
    else:
        assert result.outcome in ("skipped", "not-understood")


WORKLOAD_KINDS = st.sampled_from(["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"])


@st.composite
def weird_workloads(draw: st.DrawFn) -> tuple[str, Any]:
    kind: str = draw(WORKLOAD_KINDS)
    template: Any = draw(
        st.sampled_from([None, {}, {"metadata": None}, {"metadata": {"annotations": {}}}])
        | ANY_JSON
    )
    meta: Any = draw(
        st.fixed_dictionaries(
            {"name": st.just("w")},
            optional={
                "annotations": st.dictionaries(ANNOTATION_KEYS, ANNOTATION_VALUES) | ANY_JSON
            },
        )
        | ANY_JSON
    )
    spec: Any = (
        {"jobTemplate": {"spec": {"template": template}}}
        if kind == "CronJob"
        else {"template": template}
    )
    if draw(st.booleans()):
        spec = draw(ANY_JSON)
    return kind, {"kind": kind, "metadata": meta, "spec": spec}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weird_workloads())
def test_any_workload_is_answered_allowed(case: tuple[str, Any]) -> None:
    kind, obj = case
    body = json.loads(admission_review(obj))
    body["request"]["kind"] = {"group": "apps", "version": "v1", "kind": kind}
    body["request"]["operation"] = "UPDATE"
    result = review(json.dumps(body).encode(), "workloads", CFG)
    response = result.response["response"]
    assert response["allowed"] is True
    assert not result.log["reason"].startswith("internal error"), result.log
    patched = applied(obj, response)
    if "patch" in response:
        assert sync_workload_annotations(patched, kind)[1] == []  # in sync afterwards
