"""Hypothesis strategies for pod specs: schema-valid ones, and arbitrary JSON posing as pods."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from sidecar import contract as c

DNS_LABEL = st.from_regex(r"\A[a-z]([a-z0-9-]{0,10}[a-z0-9])?\Z")
ENV_NAME = st.sampled_from(
    [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "NO_PROXY",
        "no_proxy",
        "PATH",
        "FOO",
        "POD_NAME",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
    ]
)
ANNOTATION_VALUES = st.sampled_from(
    [
        "true",
        "false",
        "yes",
        "",
        "explicit",
        "transparent",
        "audit",
        "enforce",
        "a,b",
        "ns/cm",
        "10.0.0.0/8",
        "1.2.3.4/40",
        "443",
        "0,70000",
        "5432, 6379",
        "Bad_Name",
        "ümlaut",
    ]
)
ANNOTATION_KEYS = st.sampled_from(
    [
        c.ANNOTATION_INJECT,
        c.ANNOTATION_CAPTURE,
        c.ANNOTATION_MODE,
        c.ANNOTATION_ALLOWLIST,
        c.ANNOTATION_EXCLUDE_CIDRS,
        c.ANNOTATION_EXCLUDE_PORTS,
        c.ANNOTATION_INCLUDE_PORTS,
        c.ANNOTATION_EXCLUDE_UDP_PORTS,
        c.ANNOTATION_EXCLUDE_UDP_CIDRS,
        c.ANNOTATION_INSPECT_CA,
        "resource.opentelemetry.io/service.name",
        "other/x",
    ]
)


@st.composite
def containers(draw: st.DrawFn, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        container: dict[str, Any] = {"name": name, "image": "busybox:1.37"}
        env = draw(
            st.lists(st.tuples(ENV_NAME, st.text(max_size=5)), max_size=4, unique_by=lambda t: t[0])
        )
        if env:
            container["env"] = [{"name": n, "value": v} for n, v in env]
        if draw(st.booleans()):
            container["securityContext"] = {
                "runAsUser": draw(st.sampled_from([0, 1000, 1337])),
                "readOnlyRootFilesystem": draw(st.booleans()),
            }
        if draw(st.booleans()):
            container["restartPolicy"] = "Always"
        out.append(container)
    return out


@st.composite
def valid_pods(draw: st.DrawFn) -> dict[str, Any]:
    """Pods the API server would accept (unique container names, DNS names)."""
    names = draw(st.lists(DNS_LABEL, min_size=1, max_size=6, unique=True))
    split = draw(st.integers(min_value=1, max_value=len(names)))
    main_names, init_names = names[:split], names[split:]
    main = draw(containers(main_names))
    for m in main:
        m.pop("restartPolicy", None)  # only init containers may carry it
    spec: dict[str, Any] = {"containers": main}
    if init_names:
        spec["initContainers"] = draw(containers(init_names))
    if draw(st.booleans()):
        spec["hostNetwork"] = draw(st.booleans())
    if draw(st.booleans()):
        spec["securityContext"] = {"runAsNonRoot": draw(st.booleans())}
    if draw(st.booleans()):
        spec["restartPolicy"] = draw(st.sampled_from(["Always", "OnFailure", "Never"]))
    if draw(st.booleans()):
        spec["automountServiceAccountToken"] = draw(st.booleans())
    volumes = draw(
        st.lists(st.sampled_from(["data", "egress-sidecar-tmp", "cache"]), unique=True, max_size=2)
    )
    if volumes:
        spec["volumes"] = [{"name": v, "emptyDir": {}} for v in volumes]
    annotations: dict[str, str] = draw(
        st.dictionaries(ANNOTATION_KEYS, ANNOTATION_VALUES, max_size=5)
    )
    opt_in: bool = draw(st.booleans())
    if opt_in:
        annotations[c.ANNOTATION_INJECT] = "true"  # opt in often enough to exercise injection
    meta: dict[str, Any] = {"generateName": "web-abc12-", "labels": {"pod-template-hash": "abc12"}}
    keep_empty: bool = draw(st.booleans())
    if annotations or keep_empty:
        meta["annotations"] = annotations
    if draw(st.booleans()):
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-abc12",
                "uid": "u",
                "controller": True,
            }
        ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def weird_pods(draw: st.DrawFn) -> Any:
    """Anything at all where a pod should be, often almost a pod."""
    base = draw(valid_pods())
    choice = draw(st.integers(min_value=0, max_value=5))
    if choice == 0:
        return draw(ANY_JSON)
    if choice == 1:
        base["spec"] = draw(ANY_JSON)
    elif choice == 2:
        base["metadata"] = draw(ANY_JSON)
    elif choice == 3:
        base["spec"]["containers"] = draw(ANY_JSON)
    elif choice == 4:
        base["metadata"]["annotations"] = draw(ANY_JSON)
    else:
        base["spec"]["initContainers"] = draw(ANY_JSON)
    return base
