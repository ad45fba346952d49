"""The ways an app container can undo or bypass capture (injector/risks.py), and how the pure core
reports them: one warning per problem naming the container and the fix, in transparent capture;
one general warning in explicit capture; a warning for host-network pods that opted in."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from injector.mutate import PodContext, inject_pod, inject_workload
from injector.risks import EXPLICIT_CAPTURE, HOST_NETWORK, container_risks, has_capability
from sidecar import contract as c
from tests.injector.support import config

CFG = config()
INJECT_TRUE = {c.ANNOTATION_INJECT: "true"}
# Pod Security "restricted": nothing to warn about.
HARDENED: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def _risks(sc: dict[str, Any] | None, pod_sc: dict[str, Any] | None = None) -> list[str]:
    container: dict[str, Any] = {"name": "web", "image": "x"}
    if sc is not None:
        container["securityContext"] = sc
    return [str(r) for r in container_risks(pod_sc or {}, container)]


ROOT = "may run as root"
SETUID_ROOT = "runs as root with CAP_SETUID"
ESCALATION = "allowPrivilegeEscalation is not false"
RAW = "capability NET_RAW"
ADMIN = "capability NET_ADMIN"
PRIVILEGED = "privileged: it can remove the egress capture rules; run it unprivileged"
UID = "runs as UID 1337"


@pytest.mark.parametrize(
    ("sc", "pod_sc", "expected"),
    [
        (HARDENED, None, []),
        # the runtime's defaults: root unless told otherwise, NET_RAW and SETUID kept
        (None, None, [RAW, ROOT]),
        (
            {},
            {"runAsNonRoot": True},
            [ESCALATION + ": a setuid binary can make it root with NET_RAW, SETUID"],
        ),
        ({"runAsUser": 0, "capabilities": {"drop": ["ALL"]}}, None, []),
        ({"runAsUser": 0, "capabilities": {"drop": ["NET_RAW"]}}, None, [SETUID_ROOT]),
        ({"runAsUser": 1000}, None, [ESCALATION]),
        ({"runAsUser": 1000, "allowPrivilegeEscalation": False}, None, []),
        ({"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, None, []),
        # the container's setting wins over the pod's
        ({**HARDENED, "runAsUser": 0}, {"runAsNonRoot": True}, []),
        (
            {"runAsNonRoot": False, "capabilities": {"drop": ["NET_RAW"]}},
            {"runAsNonRoot": True},
            [ROOT],
        ),
        # UID 0 is root whatever runAsNonRoot says (the kubelet refuses that pod anyway)
        (
            {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
            {"runAsUser": 0},
            [
                RAW,
                SETUID_ROOT,
            ],
        ),
        # add wins over drop, and the CAP_ prefix and case do not hide a capability
        ({"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}, None, [ADMIN]),
        ({"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["cap_net_raw"]}}, None, [RAW]),
        (
            {"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["ALL"]}},
            None,
            [ADMIN, RAW, SETUID_ROOT],
        ),
        (
            {"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["SETUID"]}},
            None,
            [SETUID_ROOT],
        ),
        ({"runAsUser": 0, "capabilities": {"drop": ["CAP_SETUID", "NET_RAW"]}}, None, []),
        # a non-root process holds no capability unless a setuid binary gives it one
        ({**HARDENED, "capabilities": {"add": ["ALL"]}}, None, []),
        (
            {"runAsNonRoot": True, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}},
            None,
            [ESCALATION + ": a setuid binary can make it root with NET_ADMIN"],
        ),
        # privileged: one finding, the rest follows from it
        ({"privileged": True}, None, [PRIVILEGED]),
        ({**HARDENED, "privileged": True}, None, [PRIVILEGED]),
        ({**HARDENED, "privileged": False}, None, []),
        # UID 1337 is the proxy's: a bypass on its own, from the pod or the container
        ({**HARDENED, "runAsUser": 1337}, None, [UID]),
        (HARDENED, {"runAsUser": 1337}, [UID]),
        ({"runAsUser": 1337}, None, [UID, ESCALATION]),
    ],
)
def test_container_risks(
    sc: dict[str, Any] | None, pod_sc: dict[str, Any] | None, expected: list[str]
) -> None:
    found = _risks(sc, pod_sc)
    assert len(found) == len(expected), found
    for text, part in zip(found, expected, strict=True):
        assert text.startswith("container web: ") and part in text, (text, part)
        assert "; " in text  # every warning says what to change


CAPS = st.lists(
    st.sampled_from(["ALL", "NET_ADMIN", "NET_RAW", "SETUID", "CAP_SETUID", "net_raw", "CHOWN"]),
    max_size=4,
)


@given(add=CAPS, drop=CAPS, privileged=st.none() | st.booleans())
def test_capability_model(add: list[str], drop: list[str], privileged: bool | None) -> None:
    sc: dict[str, Any] = {"capabilities": {"add": add, "drop": drop}}
    if privileged is not None:
        sc["privileged"] = privileged
    norm_add = {a.upper().removeprefix("CAP_") for a in add}
    norm_drop = {d.upper().removeprefix("CAP_") for d in drop}
    for name in ("NET_ADMIN", "NET_RAW", "SETUID"):
        held = has_capability(sc, name)
        if privileged or name in norm_add or "ALL" in norm_add:
            assert held
        elif name in norm_drop or "ALL" in norm_drop:
            assert not held
        else:
            assert held is (name != "NET_ADMIN")  # NET_RAW, SETUID: runtime defaults


def _pod(spec_extra: dict[str, Any], sc: dict[str, Any] | None = None, **meta: Any) -> Any:
    container: dict[str, Any] = {"name": "web", "image": "x"}
    if sc is not None:
        container["securityContext"] = sc
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "shop", "annotations": dict(INJECT_TRUE), **meta},
        "spec": {"containers": [container], **spec_extra},
    }


def test_transparent_pod_warns_per_container_and_init_container() -> None:
    pod = _pod({"initContainers": [{"name": "migrate", "image": "x", "securityContext": HARDENED}]})
    pod["spec"]["containers"].append(
        {"name": "debug", "image": "x", "securityContext": {**HARDENED, "privileged": True}}
    )
    pod["spec"]["initContainers"][0]["securityContext"] = {
        "runAsUser": 0,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
    }
    result = inject_pod(pod, PodContext(), CFG)
    assert result.injected
    assert result.risks == (
        "container migrate: capability NET_ADMIN: it can remove the egress capture rules; drop it",
        f"container web: {RAW} (a runtime default): raw sockets can send packets the capture "
        "rules do not cover; add NET_RAW (or ALL) to capabilities.drop",
        f"container web: {ROOT} (no runAsUser/runAsNonRoot) with CAP_SETUID: it can switch to "
        "UID 1337, whose traffic is not captured; set runAsNonRoot: true, or drop SETUID (or ALL)",
        f"container debug: {PRIVILEGED}",
    )
    assert set(result.risks) <= set(result.warnings)
    # the injected containers are not the app's: never warned about
    assert not any(c.INIT_CONTAINER in w or c.SIDECAR_CONTAINER in w for w in result.warnings)


def test_explicit_capture_warns_once_whatever_the_containers() -> None:
    pod = _pod(
        {}, {"privileged": True}, annotations={**INJECT_TRUE, c.ANNOTATION_CAPTURE: "explicit"}
    )
    pod["spec"]["containers"].append({"name": "b", "image": "x"})
    result = inject_pod(pod, PodContext(), CFG)
    assert result.injected
    assert result.warnings.count(EXPLICIT_CAPTURE) == 1
    assert result.risks == ()


@pytest.mark.parametrize(
    ("annotations", "ctx", "warned"),
    [
        (INJECT_TRUE, PodContext(), True),
        ({}, PodContext(namespace_injection="enabled"), True),
        ({c.ANNOTATION_INJECT: "false"}, PodContext(namespace_injection="enabled"), False),
        (INJECT_TRUE, PodContext(namespace_injection="disabled"), False),
        ({}, PodContext(), False),
        ({**INJECT_TRUE, c.ANNOTATION_STATUS: "{}"}, PodContext(), False),
        (INJECT_TRUE, PodContext(namespace="kube-system"), False),
    ],
)
def test_host_network_pods_that_opted_in_are_warned(
    annotations: dict[str, str], ctx: PodContext, warned: bool
) -> None:
    pod = _pod({"hostNetwork": True}, HARDENED, annotations=annotations)
    if ctx.namespace:
        del pod["metadata"]["namespace"]
    result = inject_pod(pod, ctx, CFG)
    assert not result.injected and result.pod == pod
    assert result.warnings == result.risks == ((HOST_NETWORK,) if warned else ())


def test_workload_results_carry_the_template_risks() -> None:
    deploy: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "annotations": dict(INJECT_TRUE)},
        "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "x"}]}}},
    }
    result = inject_workload(deploy, CFG)
    assert result.injected and len(result.risks) == 2
    deploy["spec"]["template"]["spec"]["hostNetwork"] = True
    result = inject_workload(deploy, CFG)
    assert not result.injected and result.risks == (HOST_NETWORK,)
