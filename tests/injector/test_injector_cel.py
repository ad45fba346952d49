"""The webhook's matchConditions (CEL, evaluated by the API server before calling us) never skip
a pod or workload the injector would change, and never fail to evaluate (with failurePolicy: Fail
an evaluation error would reject the object). Evaluated with cel-python."""

from __future__ import annotations

import copy
import subprocess
from functools import cache
from typing import Any

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.mutate import PodContext, decide, inject_pod, sync_workload_annotations
from sidecar import contract as c
from tests.injector.strategies import ANNOTATION_KEYS, ANNOTATION_VALUES, valid_pods
from tests.injector.support import REPO, config

CFG = config()
ROUTE_CONTEXT = {
    "namespace.pods.egress-sidecar.io": PodContext("shop", "enabled"),
    "annotation.pods.egress-sidecar.io": PodContext("shop", None),
}


@cache
def conditions() -> dict[str, list[tuple[str, Any]]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "config")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    hook = next(
        d
        for d in yaml.safe_load_all(proc.stdout)
        if d and d["kind"] == "MutatingWebhookConfiguration"
    )
    env = celpy.Environment()
    return {
        w["name"]: [
            (m["name"], env.program(env.compile(m["expression"]))) for m in w["matchConditions"]
        ]
        for w in hook["webhooks"]
    }


@pytest.fixture(autouse=True, scope="module")
def _compiled() -> None:
    conditions()  # compile first: celpy raises the recursion limit, which hypothesis warns about


def matches(webhook: str, obj: dict[str, Any]) -> bool:
    """Whether the API server would call the webhook; fails on any evaluation error."""
    results = []
    for name, program in conditions()[webhook]:
        value = program.evaluate({"object": json_to_cel(obj)})
        assert isinstance(value, celpy.celtypes.BoolType), f"{webhook}/{name}: {value!r}"
        results.append(bool(value))
    return all(results)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_pods())
def test_pod_conditions_never_skip_an_injectable_pod(pod: dict[str, Any]) -> None:
    for webhook, ctx in ROUTE_CONTEXT.items():
        called = matches(webhook, pod)
        if decide(pod, ctx, CFG)[0]:
            assert called, webhook
        result = inject_pod(pod, ctx, CFG)
        if result.risks:  # a warning the API server never asks for is never shown
            assert called, (webhook, result.risks)
        if result.injected:
            assert not matches(webhook, result.pod), "an injected pod must not be sent again"


@pytest.mark.parametrize(
    ("annotations", "spec", "namespace_hook", "annotation_hook"),
    [
        ({}, {}, True, False),
        ({c.ANNOTATION_INJECT: "true"}, {}, True, True),
        ({c.ANNOTATION_INJECT: "false"}, {}, False, False),
        # host-network pods that opt in are sent, to be warned that they are not injected
        ({c.ANNOTATION_INJECT: "true"}, {"hostNetwork": True}, True, True),
        ({}, {"hostNetwork": True}, True, False),
        ({c.ANNOTATION_INJECT: "false"}, {"hostNetwork": True}, False, False),
        ({c.ANNOTATION_INJECT: "true"}, {"os": {"name": "windows"}}, False, False),
        ({c.ANNOTATION_INJECT: "true", c.ANNOTATION_STATUS: "{}"}, {}, False, False),
        (None, {}, True, False),
    ],
)
def test_pod_conditions_table(
    annotations: dict[str, str] | None,
    spec: dict[str, Any],
    namespace_hook: bool,
    annotation_hook: bool,
) -> None:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {},
        "spec": {"containers": [{"name": "a", "image": "x"}], **spec},
    }
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    assert matches("namespace.pods.egress-sidecar.io", pod) is namespace_hook
    assert matches("annotation.pods.egress-sidecar.io", pod) is annotation_hook


KINDS = st.sampled_from(["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"])
ANNOTATIONS = st.none() | st.dictionaries(ANNOTATION_KEYS, ANNOTATION_VALUES, max_size=3)


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    kind: str = draw(KINDS)
    meta: dict[str, Any] = {"name": "w"}
    own = draw(ANNOTATIONS)
    if own is not None:
        meta["annotations"] = own
    template: dict[str, Any] = {"spec": {"containers": [{"name": "a", "image": "x"}]}}
    tann = draw(ANNOTATIONS)
    with_meta: bool = draw(st.booleans())
    if tann is not None or with_meta:
        template["metadata"] = {} if tann is None else {"annotations": tann}
    obj: dict[str, Any] = {"apiVersion": "apps/v1", "kind": kind, "metadata": meta}
    if kind == "CronJob":
        obj["spec"] = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}
    else:
        obj["spec"] = {"template": template}
    return obj


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_workload_condition_never_skips_a_workload_to_sync(obj: dict[str, Any]) -> None:
    synced, changed = sync_workload_annotations(obj)
    if changed:
        assert matches("workloads.egress-sidecar.io", obj)
    # after the annotation is removed from the workload, the synced one is still seen
    if changed and "annotations" in obj["metadata"]:
        removed = copy.deepcopy(synced)
        removed["metadata"]["annotations"] = {
            k: v
            for k, v in removed["metadata"]["annotations"].items()
            if not k.startswith(c.PREFIX)
        }
        assert matches("workloads.egress-sidecar.io", removed)
        assert sync_workload_annotations(removed)[1]
