"""The pure mutation core: opt-in precedence, settings from annotations, identity, what is
injected where, idempotence, workload annotation sync, and the patch."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from injector.mutate import (
    ANNOTATION_FROM_WORKLOAD,
    BUNDLE_DIR,
    BUNDLE_PATH,
    CA_BUNDLE_CONTAINER,
    CA_CERT_DIR,
    CA_CERT_PATH,
    CA_CERT_VOLUME,
    CA_VOLUME,
    INSPECT_VOLUMES,
    NotAPodError,
    PodContext,
    Workload,
    decide,
    inject_pod,
    inject_workload,
    make_patch,
    owning_workload,
    read_settings,
    service_name,
    sync_workload_annotations,
)
from sidecar import contract as c
from tests.injector.support import ca_key_exposures, config, validate

CFG = config()


def pod(
    annotations: dict[str, str] | None = None,
    namespace: str | None = "shop",
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p"}
    if namespace:
        meta["namespace"] = namespace
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "busybox"}], **spec},
    }


INJECT_TRUE = {c.ANNOTATION_INJECT: "true"}


@pytest.mark.parametrize(
    ("obj", "ctx", "expected", "reason_part"),
    [
        (pod(INJECT_TRUE), PodContext(), True, "annotation egress-sidecar.io/inject=true"),
        (pod(), PodContext(namespace_injection="enabled"), True, "namespace label"),
        (pod(), PodContext(), False, "not opted in"),
        # the pod annotation wins over the namespace label, both ways
        (
            pod({c.ANNOTATION_INJECT: "false"}),
            PodContext(namespace_injection="enabled"),
            False,
            "inject=false",
        ),
        (pod(INJECT_TRUE), PodContext(namespace_injection=None), True, "inject=true"),
        # an administrator's namespace opt-out is not overridable
        (pod(INJECT_TRUE), PodContext(namespace_injection="disabled"), False, "opted out"),
        (
            pod({c.ANNOTATION_INJECT: "yes"}),
            PodContext(namespace_injection="enabled"),
            False,
            "neither",
        ),
        (pod(INJECT_TRUE, namespace="kube-system"), PodContext(), False, "never injected"),
        (pod(INJECT_TRUE, namespace="kube-public"), PodContext(), False, "never injected"),
        (pod(INJECT_TRUE, namespace="kube-node-lease"), PodContext(), False, "never injected"),
        (pod(INJECT_TRUE, namespace="egress-system"), PodContext(), False, "never injected"),
        # the request's namespace counts when the pod carries none
        (pod(INJECT_TRUE, namespace=None), PodContext(namespace="kube-system"), False, "never"),
        (pod(INJECT_TRUE, hostNetwork=True), PodContext(), False, "host-network"),
        (pod(INJECT_TRUE, hostNetwork=False), PodContext(), True, "inject=true"),
        (pod(INJECT_TRUE, os={"name": "windows"}), PodContext(), False, "Windows"),
        (pod({**INJECT_TRUE, c.ANNOTATION_STATUS: "{}"}), PodContext(), False, "already"),
    ],
)
def test_decide(obj: dict[str, Any], ctx: PodContext, expected: bool, reason_part: str) -> None:
    inject, reason = decide(obj, ctx, CFG)
    assert inject is expected
    assert reason_part in reason


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"metadata": {}}, "spec"),
        ({"spec": {"containers": "x"}}, "spec.containers"),
        ({"spec": {"containers": [], "initContainers": {}}}, "initContainers"),
        ({"spec": {"containers": [], "volumes": [1]}}, "volumes"),
        ({"metadata": [], "spec": {"containers": []}}, "metadata"),
    ],
)
def test_not_a_pod_is_named(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(NotAPodError, match=message):
        inject_pod(bad, PodContext(namespace_injection="enabled"), CFG)


@pytest.mark.parametrize(
    ("annotations", "field", "value", "warns"),
    [
        ({}, "capture", "transparent", False),
        ({c.ANNOTATION_CAPTURE: "explicit"}, "capture", "explicit", False),
        ({c.ANNOTATION_CAPTURE: "sideways"}, "capture", "transparent", True),
        ({c.ANNOTATION_MODE: "audit"}, "mode", "audit", False),
        ({c.ANNOTATION_MODE: "Audit"}, "mode", None, True),
        ({}, "configmaps", ("egress-allowlist",), False),
        ({c.ANNOTATION_ALLOWLIST: " a , ns/b ,a"}, "configmaps", ("a", "ns/b"), False),
        ({c.ANNOTATION_ALLOWLIST: "Bad_Name"}, "configmaps", ("egress-allowlist",), True),
        ({c.ANNOTATION_ALLOWLIST: "a/b/c,ok"}, "configmaps", ("ok",), True),
        (
            {c.ANNOTATION_EXCLUDE_CIDRS: "10.1.2.3/8, 2001:db8::/32"},
            "exclude_cidrs",
            ("10.0.0.0/8", "2001:db8::/32"),
            False,
        ),
        ({c.ANNOTATION_EXCLUDE_CIDRS: "nope"}, "exclude_cidrs", (), True),
        ({c.ANNOTATION_EXCLUDE_PORTS: "5432,5432, 6379"}, "exclude_ports", (5432, 6379), False),
        ({c.ANNOTATION_INCLUDE_PORTS: "0,65536,x,443"}, "include_ports", (443,), True),
        (
            {c.ANNOTATION_CAPTURE: "explicit", c.ANNOTATION_INCLUDE_PORTS: "443"},
            "include_ports",
            (443,),
            True,
        ),
        ({}, "exclude_udp_ports", (), False),
        (
            {c.ANNOTATION_EXCLUDE_UDP_PORTS: "51820, 8125,51820"},
            "exclude_udp_ports",
            (51820, 8125),
            False,
        ),
        ({c.ANNOTATION_EXCLUDE_UDP_PORTS: "dns,0,53"}, "exclude_udp_ports", (53,), True),
        (
            {c.ANNOTATION_EXCLUDE_UDP_CIDRS: "198.18.5.7/24, fd00:5::/64,198.18.5.0/24"},
            "exclude_udp_cidrs",
            ("198.18.5.0/24", "fd00:5::/64"),
            False,
        ),
        ({c.ANNOTATION_EXCLUDE_UDP_CIDRS: "10.0.0.0/33"}, "exclude_udp_cidrs", (), True),
        (
            {c.ANNOTATION_CAPTURE: "explicit", c.ANNOTATION_EXCLUDE_UDP_PORTS: "51820"},
            "exclude_udp_ports",
            (51820,),
            True,  # explicit capture installs no rules: nothing to open
        ),
    ],
)
def test_read_settings(annotations: dict[str, str], field: str, value: object, warns: bool) -> None:
    settings = read_settings(annotations, CFG)
    assert getattr(settings, field) == value
    assert bool(settings.warnings) is warns


@pytest.mark.parametrize(
    ("annotations", "warning"),
    [
        ({c.ANNOTATION_EXCLUDE_UDP_PORTS: "53"}, "53 lets DNS to any server leave the pod"),
        ({c.ANNOTATION_EXCLUDE_UDP_CIDRS: "0.0.0.0/0"}, "0.0.0.0/0 takes every destination out"),
        ({c.ANNOTATION_EXCLUDE_UDP_CIDRS: "::/0"}, "::/0 takes every destination out"),
        ({c.ANNOTATION_EXCLUDE_CIDRS: "0.0.0.0/1"}, "all of 0.0.0.0/1 out of egress control"),
        ({c.ANNOTATION_EXCLUDE_CIDRS: "2000::/3"}, "all of 2000::/3 out of egress control"),
    ],
)
def test_openings_that_defeat_capture_are_warned(annotations: dict[str, str], warning: str) -> None:
    settings = read_settings(annotations, CFG)
    assert [w for w in settings.warnings if warning in w], settings.warnings


@pytest.mark.parametrize(
    "annotations",
    [
        {c.ANNOTATION_EXCLUDE_UDP_PORTS: "8125"},
        {c.ANNOTATION_EXCLUDE_CIDRS: "10.0.0.0/8,fd00::/8"},  # a cluster's own ranges
        {c.ANNOTATION_EXCLUDE_UDP_CIDRS: "2001:db8::/32"},
    ],
)
def test_ordinary_openings_are_not_warned(annotations: dict[str, str]) -> None:
    assert read_settings(annotations, CFG).warnings == ()


def _owned(kind: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "generateName": name + "-",
        "labels": labels or {},
        "ownerReferences": [
            {"apiVersion": "v1", "kind": "Other", "name": "x", "uid": "1"},
            {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "2", "controller": True},
        ],
    }


@pytest.mark.parametrize(
    ("meta", "ctx", "expected"),
    [
        (
            _owned("ReplicaSet", "web-5d9c7b8f9c", {"pod-template-hash": "5d9c7b8f9c"}),
            PodContext(),
            Workload("Deployment", "web"),
        ),
        (
            _owned("ReplicaSet", "my-web-app-7f9", {"pod-template-hash": "7f9"}),
            PodContext(),
            Workload("Deployment", "my-web-app"),
        ),
        # a bare ReplicaSet (no pod-template-hash): reported as such
        (_owned("ReplicaSet", "rs-abc"), PodContext(), Workload("ReplicaSet", "rs-abc")),
        (_owned("StatefulSet", "db"), PodContext(), Workload("StatefulSet", "db")),
        (_owned("DaemonSet", "agent"), PodContext(), Workload("DaemonSet", "agent")),
        (_owned("Job", "migrate"), PodContext(), Workload("Job", "migrate")),
        (_owned("Job", "migrate-2"), PodContext(), Workload("Job", "migrate-2")),
        (_owned("Job", "report-29400120"), PodContext(), Workload("CronJob", "report")),
        ({"name": "lonely"}, PodContext(), None),
        ({"ownerReferences": "junk"}, PodContext(), None),
        (
            _owned("StatefulSet", "db"),
            PodContext(workload=Workload("Deployment", "w")),
            Workload("Deployment", "w"),
        ),
    ],
)
def test_owning_workload(meta: dict[str, Any], ctx: PodContext, expected: Workload | None) -> None:
    assert owning_workload(meta, ctx) == expected


@pytest.mark.parametrize(
    ("meta", "workload", "expected"),
    [
        (
            {
                "annotations": {"resource.opentelemetry.io/service.name": "svc"},
                "labels": {"app.kubernetes.io/instance": "i", "app.kubernetes.io/name": "n"},
                "name": "p",
            },
            Workload("Deployment", "w"),
            "svc",
        ),
        (
            {
                "labels": {"app.kubernetes.io/instance": "i", "app.kubernetes.io/name": "n"},
                "name": "p",
            },
            Workload("Deployment", "w"),
            "i",
        ),
        (
            {"labels": {"app.kubernetes.io/name": "n", "app": "a"}, "name": "p"},
            Workload("Deployment", "w"),
            "n",
        ),
        ({"labels": {"app": "a"}, "name": "p"}, Workload("Deployment", "w"), "w"),
        ({"name": "p"}, None, "p"),
        ({"generateName": "p-"}, None, "$(POD_NAME)"),
    ],
)
def test_service_name_order(meta: dict[str, Any], workload: Workload | None, expected: str) -> None:
    assert service_name(meta, workload) == expected


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_native_transparent_layout_and_sidecar_contract() -> None:
    src = pod(INJECT_TRUE, initContainers=[{"name": "setup", "image": "busybox"}])
    result = inject_pod(src, PodContext(), CFG)
    assert result.injected
    spec = result.pod["spec"]
    assert [x["name"] for x in spec["initContainers"]] == ["egress-init", "egress-sidecar", "setup"]
    assert [x["name"] for x in spec["containers"]] == ["app"]
    sidecar = spec["initContainers"][1]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["egress-sidecar", "run"]
    assert sidecar["args"] == [
        "--configmap",
        "egress-allowlist",
        "--confdir",
        "/var/run/egress-sidecar/mitmproxy",
    ]
    assert [(p["name"], p["containerPort"]) for p in sidecar["ports"]] == [
        ("egress-proxy", 15001),
        ("egress-transp", 15002),
        ("egress-health", 15021),
    ]
    assert sidecar["startupProbe"]["httpGet"] == {
        "path": "/healthz/ready",
        "port": 15021,
        "scheme": "HTTP",
    }
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
    sc = sidecar["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    env = _env(sidecar)
    assert list(env)[:3] == ["POD_NAME", "POD_NAMESPACE", "NODE_NAME"]  # before their users
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger-collector.observability:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert env["OTEL_RESOURCE_ATTRIBUTES"].startswith(
        "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.node.name=$(NODE_NAME)"
    )
    init = spec["initContainers"][0]
    assert init["command"] == ["egress-sidecar", "iptables", "apply"]
    assert init["args"][:4] == ["--proxy-uid", "1337", "--proxy-port", "15002"]
    assert "HTTP_PROXY" not in _env(spec["containers"][0])  # transparent: no proxy env
    status = json.loads(result.pod["metadata"]["annotations"][c.ANNOTATION_STATUS])
    assert status["initContainers"] == ["egress-init", "egress-sidecar"]
    assert status["capture"] == "transparent"
    assert {v["name"] for v in spec["volumes"]} == set(status["volumes"])
    assert src["spec"]["containers"] == [{"name": "app", "image": "busybox"}]  # input untouched


@pytest.mark.parametrize(
    ("annotations", "tail"),
    [
        ({}, []),
        (
            {c.ANNOTATION_EXCLUDE_UDP_PORTS: "51820,8125", c.ANNOTATION_EXCLUDE_UDP_CIDRS:
             "198.18.5.0/24,fd00:5::/64"},
            ["--exclude-outbound-udp-ports", "51820,8125",
             "--exclude-outbound-udp-cidrs", "198.18.5.0/24,fd00:5::/64"],
        ),
        # a bad item is dropped (with a warning), the good ones are passed on
        ({c.ANNOTATION_EXCLUDE_UDP_PORTS: "wireguard,51820"},
         ["--exclude-outbound-udp-ports", "51820"]),
        ({c.ANNOTATION_EXCLUDE_UDP_CIDRS: "nope"}, []),
    ],
)  # fmt: skip
def test_udp_annotations_become_init_args(annotations: dict[str, str], tail: list[str]) -> None:
    result = inject_pod(pod({**INJECT_TRUE, **annotations}), PodContext(), CFG)
    args = result.pod["spec"]["initContainers"][0]["args"]
    udp = [a for a in args if "udp" in a]
    assert args[len(args) - len(tail) :] == tail and len(udp) == len(tail) // 2
    # Whatever the annotations, no argument names the DNS servers: egress-init reads the
    # pod's own resolv.conf when it runs.
    assert "--dns-servers" not in args and "--resolv-conf" not in args


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (c.ANNOTATION_EXCLUDE_UDP_PORTS, "0", "exclude-outbound-udp-ports: '0' is not a port"),
        (c.ANNOTATION_EXCLUDE_UDP_CIDRS, "198.18.5.0/40",
         "exclude-outbound-udp-cidrs: '198.18.5.0/40' is not a CIDR"),
    ],
)  # fmt: skip
def test_bad_udp_annotations_warn_naming_the_value(key: str, value: str, message: str) -> None:
    result = inject_pod(pod({**INJECT_TRUE, key: value}), PodContext(), CFG)
    assert result.injected and any(message in w for w in result.warnings), result.warnings


def test_container_style_explicit_layout() -> None:
    src = pod({**INJECT_TRUE, c.ANNOTATION_CAPTURE: "explicit", c.ANNOTATION_MODE: "audit"})
    result = inject_pod(src, PodContext(), config("container"))
    spec = result.pod["spec"]
    assert "initContainers" not in spec  # explicit: no egress-init, none of the user's
    assert [x["name"] for x in spec["containers"]] == ["egress-sidecar", "app"]
    sidecar = spec["containers"][0]
    assert "restartPolicy" not in sidecar
    assert sidecar["lifecycle"]["postStart"]["exec"]["command"][0] == "python3"
    assert "/healthz/ready" in sidecar["lifecycle"]["postStart"]["exec"]["command"][2]
    assert sidecar["args"][-1] == "--no-transparent"
    assert sidecar["args"][2:4] == ["--mode", "audit"]
    assert [p["containerPort"] for p in sidecar["ports"]] == [15001, 15021]
    env = _env(spec["containers"][1])
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:15001"
    assert env["NO_PROXY"] == env["no_proxy"]
    assert env["NO_PROXY"].startswith("localhost,127.0.0.1,::1,.svc,.cluster.local,10.0.0.0/8")


def test_explicit_keeps_user_proxy_variables() -> None:
    src = pod({**INJECT_TRUE, c.ANNOTATION_CAPTURE: "explicit"})
    src["spec"]["containers"][0]["env"] = [{"name": "no_proxy", "value": "mine"}]
    result = inject_pod(src, PodContext(), CFG)
    env = _env(result.pod["spec"]["containers"][0])
    assert env["no_proxy"] == "mine" and "NO_PROXY" not in env
    assert env["HTTP_PROXY"] == "http://127.0.0.1:15001"
    assert any("kept" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("spec_extra", "warning"),
    [
        ({"securityContext": {"runAsUser": 1337}}, "UID 1337"),
        ({"restartPolicy": "Never"}, None),
    ],
)
def test_warnings(spec_extra: dict[str, Any], warning: str | None) -> None:
    obj = pod(INJECT_TRUE, **spec_extra)
    # hardened as Pod Security "restricted" asks: no capture-bypass warning (tests/injector/
    # test_injector_risks.py has those)
    obj["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    result = inject_pod(obj, PodContext(), CFG)
    assert result.injected
    if warning:
        assert any(warning in w for w in result.warnings)
    else:
        assert result.warnings == ()


def test_container_style_job_warns() -> None:
    result = inject_pod(pod(INJECT_TRUE, restartPolicy="Never"), PodContext(), config("container"))
    assert any("never exits" in w for w in result.warnings)


@pytest.mark.parametrize("name", ["egress-sidecar", "egress-init"])
def test_name_clash_is_not_injected(name: str) -> None:
    src = pod(INJECT_TRUE)
    src["spec"]["containers"].append({"name": name, "image": "x"})
    result = inject_pod(src, PodContext(), CFG)
    assert not result.injected and name in result.reason
    assert result.pod == src


def test_volume_clash_is_not_injected() -> None:
    src = pod(INJECT_TRUE, volumes=[{"name": "egress-sidecar-confdir", "emptyDir": {}}])
    result = inject_pod(src, PodContext(), CFG)
    assert not result.injected and "egress-sidecar-confdir" in result.reason


@pytest.mark.parametrize("style", ["native", "container"])
@pytest.mark.parametrize("capture", ["transparent", "explicit"])
def test_injecting_twice_equals_once(style: str, capture: str) -> None:
    cfg = config(style)
    src = pod({**INJECT_TRUE, c.ANNOTATION_CAPTURE: capture})
    once = inject_pod(src, PodContext(), cfg)
    twice = inject_pod(once.pod, PodContext(), cfg)
    assert once.injected and not twice.injected
    assert twice.pod == once.pod
    assert make_patch(once.pod, twice.pod) == []


def test_patch_applies_to_the_original() -> None:
    src = pod(INJECT_TRUE)
    result = inject_pod(src, PodContext(), CFG)
    patch = make_patch(src, result.pod)
    assert patch and all(op["op"] in ("add", "replace", "remove", "move", "copy") for op in patch)
    assert jsonpatch.apply_patch(copy.deepcopy(src), patch) == result.pod


def deployment(annotations: dict[str, str] | None, template_annotations: dict[str, str] | None):  # type: ignore[no-untyped-def]
    meta: dict[str, Any] = {"name": "web", "namespace": "shop"}
    if annotations is not None:
        meta["annotations"] = annotations
    tmeta: dict[str, Any] = {"labels": {"app": "web"}}
    if template_annotations is not None:
        tmeta["annotations"] = template_annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": tmeta,
                "spec": {"containers": [{"name": "web", "image": "x"}]},
            },
        },
    }


def test_workload_annotations_are_copied_and_removed() -> None:
    # kubectl annotate deploy web egress-sidecar.io/inject=true
    annotated = deployment({c.ANNOTATION_INJECT: "true", "other": "x"}, {"keep": "me"})
    synced, changed = sync_workload_annotations(annotated)
    tann = synced["spec"]["template"]["metadata"]["annotations"]
    assert tann == {
        "keep": "me",
        c.ANNOTATION_INJECT: "true",
        ANNOTATION_FROM_WORKLOAD: c.ANNOTATION_INJECT,
    }
    assert changed == [c.ANNOTATION_INJECT, ANNOTATION_FROM_WORKLOAD]
    # idempotent
    again, changed_again = sync_workload_annotations(synced)
    assert again == synced and changed_again == []
    # kubectl annotate deploy web egress-sidecar.io/inject-
    removed = copy.deepcopy(synced)
    del removed["metadata"]["annotations"][c.ANNOTATION_INJECT]
    cleaned, changed = sync_workload_annotations(removed)
    assert cleaned["spec"]["template"]["metadata"]["annotations"] == {"keep": "me"}
    assert set(changed) == {c.ANNOTATION_INJECT, ANNOTATION_FROM_WORKLOAD}


def test_workload_wins_over_template_and_status_is_never_copied() -> None:
    obj = deployment(
        {c.ANNOTATION_MODE: "audit", c.ANNOTATION_STATUS: "x"},
        {c.ANNOTATION_MODE: "enforce", c.ANNOTATION_CAPTURE: "explicit"},
    )
    synced, _ = sync_workload_annotations(obj)
    tann = synced["spec"]["template"]["metadata"]["annotations"]
    assert tann[c.ANNOTATION_MODE] == "audit"
    assert tann[c.ANNOTATION_CAPTURE] == "explicit"  # the template's own: not the workload's
    assert c.ANNOTATION_STATUS not in tann
    assert tann[ANNOTATION_FROM_WORKLOAD] == c.ANNOTATION_MODE


def test_workload_without_annotations_is_unchanged() -> None:
    obj = deployment(None, None)
    synced, changed = sync_workload_annotations(obj)
    assert changed == [] and synced == obj


def test_cronjob_template_path() -> None:
    obj = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "r", "annotations": {c.ANNOTATION_INJECT: "true"}},
        "spec": {
            "schedule": "* * * * *",
            "jobTemplate": {
                "spec": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "r", "image": "x"}],
                        }
                    }
                }
            },
        },
    }
    result = inject_workload(obj, CFG)
    assert result.injected
    tmpl = result.pod["spec"]["jobTemplate"]["spec"]["template"]
    assert tmpl["metadata"]["annotations"][c.ANNOTATION_INJECT] == "true"
    assert tmpl["spec"]["initContainers"][1]["name"] == "egress-sidecar"
    env = _env(tmpl["spec"]["initContainers"][1])
    assert (env["EGRESS_WORKLOAD_KIND"], env["EGRESS_WORKLOAD_NAME"]) == ("CronJob", "r")


def test_sync_rejects_kinds_without_template() -> None:
    with pytest.raises(NotAPodError, match="Service"):
        sync_workload_annotations({"kind": "Service", "metadata": {}})


def test_container_style_wait_script_is_python_with_the_configured_timeout() -> None:
    cfg = config("container", ready_timeout_seconds=7)
    result = inject_pod(pod(INJECT_TRUE), PodContext(), cfg)
    sidecar = result.pod["spec"]["containers"][0]
    script = sidecar["lifecycle"]["postStart"]["exec"]["command"][2]
    compile(script, "postStart", "exec")
    assert "time.monotonic() + 7" in script
    assert sidecar["startupProbe"]["failureThreshold"] == 7


def test_configured_otel_env_and_resource_attributes_are_merged() -> None:
    cfg = config(
        otel_env=(
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        )
    )
    result = inject_pod(pod(INJECT_TRUE), PodContext(), cfg)
    env = _env(result.pod["spec"]["initContainers"][1])
    assert env["OTEL_RESOURCE_ATTRIBUTES"].startswith(
        "deployment.environment=prod,k8s.namespace.name=$(POD_NAMESPACE),"
    )
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_always_on"
    assert [k for k in env if k == "OTEL_RESOURCE_ATTRIBUTES"] == ["OTEL_RESOURCE_ATTRIBUTES"]


@pytest.mark.parametrize("automount", [None, True, False])
def test_sidecar_gets_a_token_when_the_pod_opts_out_of_one(automount: bool | None) -> None:
    extra: dict[str, Any] = {} if automount is None else {"automountServiceAccountToken": automount}
    result = inject_pod(pod(INJECT_TRUE, **extra), PodContext(), CFG)
    spec = result.pod["spec"]
    validate(result.pod)
    names = [v["name"] for v in spec["volumes"]]
    sidecar_mounts = {m["mountPath"]: m["name"] for m in spec["initContainers"][1]["volumeMounts"]}
    status = json.loads(result.pod["metadata"]["annotations"][c.ANNOTATION_STATUS])
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    if automount is False:
        assert "egress-sidecar-token" in names and "egress-sidecar-token" in status["volumes"]
        assert sidecar_mounts[token_path] == "egress-sidecar-token"
        assert "volumeMounts" not in spec["containers"][0]  # the app stays without a token
        assert spec["automountServiceAccountToken"] is False
    else:
        assert "egress-sidecar-token" not in names and token_path not in sidecar_mounts


# --------------------------------------------------------------------------- HTTPS inspection

INSPECT = {**INJECT_TRUE, c.ANNOTATION_INSPECT_CA: "true"}
TRUST_VARIABLES = {
    "SSL_CERT_FILE": BUNDLE_PATH,
    "REQUESTS_CA_BUNDLE": BUNDLE_PATH,
    "CURL_CA_BUNDLE": BUNDLE_PATH,
    "NODE_EXTRA_CA_CERTS": CA_CERT_PATH,
}


def _containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in (spec.get("initContainers") or []) + spec["containers"]}


@pytest.mark.parametrize("style", ["native", "container"])
@pytest.mark.parametrize("capture", ["transparent", "explicit"])
def test_inspection_layout(style: str, capture: str) -> None:
    src = pod(
        {**INSPECT, c.ANNOTATION_CAPTURE: capture},
        initContainers=[{"name": "setup", "image": "busybox"}],
    )
    result = inject_pod(src, PodContext(), config(style))
    assert result.injected
    spec = result.pod["spec"]
    validate(result.pod)
    init_names = [x["name"] for x in spec["initContainers"]]
    ours = (["egress-init"] if capture == "transparent" else []) + [CA_BUNDLE_CONTAINER]
    if style == "native":
        # the bundle is written before anything of the app's starts
        assert init_names == [*ours, c.SIDECAR_CONTAINER, "setup"]
    else:
        assert init_names == [*ours, "setup"]
    containers = _containers(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[CA_VOLUME]["secret"] == {
        "secretName": "egress-ca",
        "optional": True,  # a missing Secret fails the inspected hosts, not the pod
        "defaultMode": 0o444,
    }
    assert volumes[CA_CERT_VOLUME]["secret"]["items"] == [{"key": "tls.crt", "path": "ca.crt"}]
    sidecar = containers[c.SIDECAR_CONTAINER]
    assert _env(sidecar)[c.ENV_INSPECT_CA_DIR] == c.INSPECT_CA_DIR == "/etc/egress-sidecar/ca"
    assert {"name": CA_VOLUME, "mountPath": c.INSPECT_CA_DIR, "readOnly": True} in sidecar[
        "volumeMounts"
    ]
    bundler = containers[CA_BUNDLE_CONTAINER]
    assert bundler["command"] == ["egress-injector", "ca-bundle"]
    assert bundler["args"] == ["--ca", CA_CERT_PATH, "--out", BUNDLE_PATH, "--optional"]
    assert {m["name"] for m in bundler["volumeMounts"]} == {
        CA_CERT_VOLUME,
        "egress-sidecar-ca-bundle",
    }
    sc = bundler["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["capabilities"]) == (
        1337,
        True,
        {"drop": ["ALL"]},
    )
    for name in ("setup", "app"):
        app = containers[name]
        for var, value in TRUST_VARIABLES.items():
            assert _env(app)[var] == value
        mounts = {m["mountPath"]: m for m in app["volumeMounts"]}
        assert mounts[CA_CERT_DIR] == {
            "name": CA_CERT_VOLUME,
            "mountPath": CA_CERT_DIR,
            "readOnly": True,
        }
        assert mounts[BUNDLE_DIR]["readOnly"] is True
    assert ca_key_exposures(spec) == []
    status = json.loads(result.pod["metadata"]["annotations"][c.ANNOTATION_STATUS])
    assert status["inspectCA"] is True
    assert CA_BUNDLE_CONTAINER in status["initContainers"]
    assert set(INSPECT_VOLUMES) <= set(status["volumes"])
    again = inject_pod(result.pod, PodContext(), config(style))
    assert not again.injected and again.pod == result.pod


@pytest.mark.parametrize(("value", "warns"), [(None, False), ("false", False), ("yes", True)])
def test_no_inspection_without_the_annotation(value: str | None, warns: bool) -> None:
    annotations = dict(INJECT_TRUE)
    if value is not None:
        annotations[c.ANNOTATION_INSPECT_CA] = value
    result = inject_pod(pod(annotations), PodContext(), CFG)
    assert result.injected
    text = json.dumps(result.pod)
    for absent in ("egress-ca", CA_BUNDLE_CONTAINER, c.ENV_INSPECT_CA_DIR, *TRUST_VARIABLES):
        assert absent not in text
    assert "inspectCA" not in result.pod["metadata"]["annotations"][c.ANNOTATION_STATUS]
    assert any(c.ANNOTATION_INSPECT_CA in w for w in result.warnings) is warns


def test_trust_variables_the_app_sets_are_kept() -> None:
    src = pod(INSPECT)
    app = src["spec"]["containers"][0]
    app["env"] = [{"name": "SSL_CERT_FILE", "value": "/etc/mine.pem"}]
    app["envFrom"] = [{"configMapRef": {"name": "settings"}}]
    result = inject_pod(src, PodContext(), CFG)
    env = _env(result.pod["spec"]["containers"][0])
    assert env["SSL_CERT_FILE"] == "/etc/mine.pem"
    assert [e["name"] for e in result.pod["spec"]["containers"][0]["env"]].count(
        "SSL_CERT_FILE"
    ) == 1
    assert env["REQUESTS_CA_BUNDLE"] == BUNDLE_PATH
    assert env["NODE_EXTRA_CA_CERTS"] == CA_CERT_PATH
    assert any(
        "SSL_CERT_FILE it sets itself kept" in w and CA_CERT_PATH in w for w in result.warnings
    )
    assert any("envFrom are overridden" in w for w in result.warnings)


def test_a_mount_path_the_app_uses_is_left_to_it() -> None:
    src = pod(INSPECT)
    src["spec"]["containers"][0]["volumeMounts"] = [{"name": "own", "mountPath": BUNDLE_DIR}]
    src["spec"]["volumes"] = [{"name": "own", "emptyDir": {}}]
    result = inject_pod(src, PodContext(), CFG)
    mounts = result.pod["spec"]["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in mounts].count(BUNDLE_DIR) == 1
    assert any(f"mounts {BUNDLE_DIR} itself" in w for w in result.warnings)
    validate(result.pod)


def test_shared_process_namespace_is_warned_about_when_inspecting() -> None:
    for wanted, warned in ((INSPECT, True), (INJECT_TRUE, False)):
        result = inject_pod(pod(wanted, shareProcessNamespace=True), PodContext(), CFG)
        assert any("shareProcessNamespace" in w for w in result.warnings) is warned


def test_inspection_names_clash() -> None:
    src = pod(INSPECT)
    src["spec"]["containers"].append({"name": CA_BUNDLE_CONTAINER, "image": "x"})
    result = inject_pod(src, PodContext(), CFG)
    assert not result.injected and CA_BUNDLE_CONTAINER in result.reason
    src["metadata"]["annotations"] = dict(INJECT_TRUE)  # the name is only ours when inspecting
    assert inject_pod(src, PodContext(), CFG).injected
    src = pod(INSPECT, volumes=[{"name": CA_CERT_VOLUME, "emptyDir": {}}])
    result = inject_pod(src, PodContext(), CFG)
    assert not result.injected and CA_CERT_VOLUME in result.reason


def test_inspect_annotation_on_the_workload_reaches_its_pods() -> None:
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "annotations": INSPECT},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            },
        },
    }
    result = inject_workload(deploy, CFG)
    template = result.pod["spec"]["template"]
    assert template["metadata"]["annotations"][c.ANNOTATION_INSPECT_CA] == "true"
    assert CA_BUNDLE_CONTAINER in _containers(template["spec"])
    validate(result.pod)


@pytest.mark.parametrize(
    ("volume", "extra", "way"),
    [
        ({"name": "ca", "secret": {"secretName": "egress-ca"}}, {}, "volume ca"),
        (
            {"name": "ca", "projected": {"sources": [{"secret": {"name": "egress-ca"}}]}},
            {},
            "volume ca",
        ),
        (
            None,
            {
                "env": [
                    {
                        "name": "CA_KEY",
                        "valueFrom": {"secretKeyRef": {"name": "egress-ca", "key": "tls.key"}},
                    }
                ]
            },
            "env CA_KEY",
        ),
        (None, {"envFrom": [{"secretRef": {"name": "egress-ca"}}]}, "envFrom"),
    ],
)
@pytest.mark.parametrize("inspect", [True, False])
def test_an_app_that_takes_the_ca_key_itself_is_warned(
    volume: dict[str, Any] | None, extra: dict[str, Any], way: str, inspect: bool
) -> None:
    src = pod(INSPECT if inspect else INJECT_TRUE)
    app = src["spec"]["containers"][0]
    app.update(extra)
    if volume is not None:
        src["spec"]["volumes"] = [volume]
        app["volumeMounts"] = [{"name": volume["name"], "mountPath": "/ca"}]
    result = inject_pod(src, PodContext(), CFG)
    assert result.injected  # the deployer is trusted: a warning, not a refusal
    assert any(w.startswith(f"container app: {way} gives it the key") for w in result.warnings), (
        result.warnings
    )


def test_the_certificate_alone_is_not_warned_about() -> None:
    src = pod(INSPECT)
    src["spec"]["volumes"] = [
        {
            "name": "ca",
            "secret": {"secretName": "egress-ca", "items": [{"key": "tls.crt", "path": "c"}]},
        }
    ]
    src["spec"]["containers"][0]["volumeMounts"] = [{"name": "ca", "mountPath": "/ca"}]
    result = inject_pod(src, PodContext(), CFG)
    assert not any("gives it the key" in w for w in result.warnings)
