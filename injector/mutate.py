"""The pure mutation core: pod spec in, pod spec out, plus the reason it did or did not inject.

No HTTP, no Kubernetes client, no I/O (an import-linter contract keeps it so). The webhook and the
offline ``inject`` command are thin adapters around ``inject_pod``, ``sync_workload_annotations``
and ``make_patch``; the JSON Patch is always derived by diffing (``jsonpatch.make_patch``).

What is injected (see docs/injector.md):

- native style (default): ``initContainers = [egress-init?, egress-sidecar(restartPolicy: Always),
  *user init containers]`` so that user init containers and app containers start only once the
  sidecar's startupProbe (``/healthz/ready``: policy loaded, listeners up) has passed;
- container style (clusters before 1.29): the sidecar is the first regular container with a
  postStart hook that blocks the next containers until it is ready;
- capture transparent: ``egress-init`` runs ``egress-sidecar iptables apply`` as root with only
  NET_ADMIN and NET_RAW; capture explicit: HTTP(S)_PROXY/NO_PROXY in every other container;
- HTTPS inspection (annotation ``egress-sidecar.io/inspect-ca: "true"``): the Secret ``egress-ca``
  whole into the sidecar only; its certificate alone (never the key) and a bundle of system roots
  + that certificate, built by the init container ``egress-ca-bundle``, into every app container,
  with the trust-store variables pointing at them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jsonpatch

from injector import __version__
from injector.config import Capture, InjectorConfig
from injector.risks import EXPLICIT_CAPTURE, HOST_NETWORK, transparent_risks
from sidecar import contract as c

JSON = dict[str, Any]

CONFDIR: Final = "/var/run/egress-sidecar/mitmproxy"
CONFDIR_VOLUME: Final = "egress-sidecar-confdir"
TMP_VOLUME: Final = "egress-sidecar-tmp"
TOKEN_VOLUME: Final = "egress-sidecar-token"
INJECTED_VOLUMES: Final = (CONFDIR_VOLUME, TMP_VOLUME, TOKEN_VOLUME)
# HTTPS inspection. The Secret's key reaches the sidecar alone: app containers and the bundle
# step get a volume of the Secret's tls.crt item only.
CA_VOLUME: Final = "egress-sidecar-ca"  # the whole Secret egress-ca: the sidecar only
CA_CERT_VOLUME: Final = "egress-sidecar-ca-cert"  # its tls.crt alone, as ca.crt
BUNDLE_VOLUME: Final = "egress-sidecar-ca-bundle"  # emptyDir: system roots + the CA
INSPECT_VOLUMES: Final = (CA_VOLUME, CA_CERT_VOLUME, BUNDLE_VOLUME)
CA_CERT_DIR: Final = "/etc/egress-sidecar/ca-cert"
CA_CERT_PATH: Final = CA_CERT_DIR + "/ca.crt"
BUNDLE_DIR: Final = "/etc/egress-sidecar/ca-bundle"
BUNDLE_PATH: Final = BUNDLE_DIR + "/ca-certificates.crt"
CA_BUNDLE_CONTAINER: Final = "egress-ca-bundle"
# What the app containers' TLS libraries read: OpenSSL (Python ssl, Ruby, PHP, Go on Linux, curl
# built on OpenSSL) SSL_CERT_FILE; Python requests REQUESTS_CA_BUNDLE; curl CURL_CA_BUNDLE; all a
# whole bundle, replacing the image's. Node adds NODE_EXTRA_CA_CERTS to its built-in roots.
TRUST_ENV: Final = (
    ("SSL_CERT_FILE", BUNDLE_PATH),
    ("REQUESTS_CA_BUNDLE", BUNDLE_PATH),
    ("CURL_CA_BUNDLE", BUNDLE_PATH),
    ("NODE_EXTRA_CA_CERTS", CA_CERT_PATH),
)
TOKEN_PATH: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
# Template annotation listing the egress-sidecar.io/* keys that were copied from the workload's
# own metadata, so that removing one from the workload removes it from the template too.
ANNOTATION_FROM_WORKLOAD: Final = c.PREFIX + "workload-annotations"
OTEL_SERVICE_NAME_ANNOTATION: Final = "resource.opentelemetry.io/service.name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_NAME: Final = "app.kubernetes.io/name"
PROXY_URL: Final = f"http://127.0.0.1:{c.EXPLICIT_PORT}"
PROXY_ENV_NAMES: Final = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

# Where each workload kind keeps its pod template.
TEMPLATE_PATHS: Final[Mapping[str, tuple[str, ...]]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
# OTel resource attribute naming the owning workload, per kind.
_WORKLOAD_ATTRIBUTE: Final = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "ReplicaSet": "k8s.replicaset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
}
# A CronJob names its Jobs "<cronjob>-<scheduled time in minutes since the epoch>".
_CRONJOB_JOB = re.compile(r"^(?P<cronjob>.+)-\d{8,}$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

NamespaceInjection = Literal["enabled", "disabled"] | None


class NotAPodError(ValueError):
    """The object handed to the core has no pod shape (metadata/spec mappings); names the part."""


@dataclass(frozen=True)
class Workload:
    kind: str
    name: str


@dataclass(frozen=True)
class PodContext:
    """What the core knows about where the pod lives, beyond the pod itself.

    ``namespace``: the namespace the pod is created in (None when unknown, e.g. offline).
    ``namespace_injection``: the namespace's ``egress-sidecar.io/injection`` label value.
    ``workload``: the workload whose template this is (offline inject of a Deployment, ...).
    """

    namespace: str | None = None
    namespace_injection: NamespaceInjection = None
    workload: Workload | None = None


@dataclass(frozen=True)
class PodResult:
    """The outcome for one pod (or pod template): the pod after mutation, and why."""

    pod: JSON
    injected: bool
    reason: str
    warnings: tuple[str, ...] = ()
    # The warnings that say how the app can bypass capture (injector/risks.py); also in
    # ``warnings``. ``refuseCaptureBypass`` refuses a pod that has any.
    risks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """The per-pod choices read from the annotations, after validation."""

    capture: Capture
    configmaps: tuple[str, ...]
    mode: str | None
    exclude_cidrs: tuple[str, ...]
    exclude_ports: tuple[int, ...]
    include_ports: tuple[int, ...]
    exclude_udp_ports: tuple[int, ...] = ()
    exclude_udp_cidrs: tuple[str, ...] = ()
    inspect_ca: bool = False
    warnings: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- opt-in decision


def _annotations(meta: Mapping[str, Any]) -> dict[str, str]:
    raw = meta.get("annotations")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None}


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    raw = meta.get("labels")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None}


def _split_pod(pod: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if not isinstance(pod, Mapping):
        raise NotAPodError(f"expected a pod mapping, got {type(pod).__name__}")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec")
    if not isinstance(meta, Mapping):
        raise NotAPodError("metadata is not a mapping")
    if not isinstance(spec, Mapping):
        raise NotAPodError("spec is missing or not a mapping")
    for key in ("annotations", "labels"):
        value = meta.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise NotAPodError(f"metadata.{key} is not a mapping")
    containers = spec.get("containers")
    if not isinstance(containers, list):
        raise NotAPodError("spec.containers is missing or not a list of containers")
    init = spec.get("initContainers")
    if init is not None and not isinstance(init, list):
        raise NotAPodError("spec.initContainers is not a list of containers")
    for where, items in (("containers", containers), ("initContainers", init or [])):
        for i, container in enumerate(items):
            if not isinstance(container, Mapping) or not isinstance(container.get("name"), str):
                raise NotAPodError(f"spec.{where}[{i}] is not a container with a name")
            env = container.get("env")
            if env is not None and (
                not isinstance(env, list) or not all(isinstance(e, Mapping) for e in env)
            ):
                raise NotAPodError(f"spec.{where}[{i}].env is not a list of variables")
    volumes = spec.get("volumes")
    if volumes is not None and (
        not isinstance(volumes, list)
        or not all(isinstance(v, Mapping) and isinstance(v.get("name"), str) for v in volumes)
    ):
        raise NotAPodError("spec.volumes is not a list of named volumes")
    for key in ("securityContext", "os"):
        value = spec.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise NotAPodError(f"spec.{key} is not a mapping")
    return meta, spec


def decide(pod: Mapping[str, Any], ctx: PodContext, cfg: InjectorConfig) -> tuple[bool, str]:
    """Whether to inject, and why: the opt-in precedence of DESIGN.md.

    Never: already injected, system or injector namespaces, host-network or Windows pods.
    Then the pod annotation ``egress-sidecar.io/inject`` ("true"/"false") decides, and without
    it the namespace label ``egress-sidecar.io/injection=enabled``. A namespace labelled
    ``disabled`` is an administrator's opt-out that a pod cannot override.
    """
    meta, spec = _split_pod(pod)
    annotations = _annotations(meta)
    if c.ANNOTATION_STATUS in annotations:
        return False, f"already injected ({c.ANNOTATION_STATUS} is set)"
    namespace = ctx.namespace or _str_or_none(meta.get("namespace"))
    if namespace in cfg.excluded_namespaces:
        return False, f"namespace {namespace} is never injected"
    if spec.get("hostNetwork") is True:
        return False, (
            "host-network pod: its traffic is the node's, iptables rules would capture the "
            "whole node, so it is never injected"
        )
    os_name = (spec.get("os") or {}).get("name")
    if os_name == "windows":
        return False, "Windows pod: the sidecar and iptables capture need Linux"
    return _opted_in(annotations, ctx)


def _opted_in(annotations: Mapping[str, str], ctx: PodContext) -> tuple[bool, str]:
    """The pod's and the namespace's own choice, once nothing rules the pod out."""
    if ctx.namespace_injection == "disabled":
        return False, f"namespace opted out ({c.LABEL_INJECTION}=disabled)"
    value = annotations.get(c.ANNOTATION_INJECT)
    if value == "true":
        return True, f"pod annotation {c.ANNOTATION_INJECT}=true"
    if value == "false":
        return False, f"pod annotation {c.ANNOTATION_INJECT}=false"
    if value is not None:
        return False, (
            f'pod annotation {c.ANNOTATION_INJECT}={value!r} is neither "true" nor "false"'
        )
    if ctx.namespace_injection == "enabled":
        return True, f"namespace label {c.LABEL_INJECTION}=enabled"
    return False, "not opted in (no pod annotation, namespace not labelled)"


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- annotations


def read_settings(annotations: Mapping[str, str], cfg: InjectorConfig) -> Settings:
    """Validate the tuning annotations. A bad value never blocks the pod: it is dropped with a
    warning, falling back to the stricter behaviour (enforce, transparent, capture more)."""
    warnings: list[str] = []
    capture_raw = annotations.get(c.ANNOTATION_CAPTURE)
    capture: Capture = cfg.default_capture
    if capture_raw in ("transparent", "explicit"):
        capture = "transparent" if capture_raw == "transparent" else "explicit"
    elif capture_raw is not None:
        warnings.append(
            f"{c.ANNOTATION_CAPTURE}={capture_raw!r} is not transparent or explicit; "
            f"using {capture}"
        )
    mode_raw = annotations.get(c.ANNOTATION_MODE)
    mode: str | None = None
    if mode_raw in ("enforce", "audit"):
        mode = mode_raw
    elif mode_raw is not None:
        warnings.append(
            f"{c.ANNOTATION_MODE}={mode_raw!r} is not enforce or audit; "
            "the allowlist's own mode (default enforce) applies"
        )
    configmaps: list[str] = []
    for ref in _split_list(annotations.get(c.ANNOTATION_ALLOWLIST)):
        if _valid_configmap_ref(ref):
            if ref not in configmaps:
                configmaps.append(ref)
        else:
            warnings.append(f"{c.ANNOTATION_ALLOWLIST}: {ref!r} is not a ConfigMap name; ignored")
    if not configmaps:
        configmaps = [c.DEFAULT_ALLOWLIST_CONFIGMAP]
    cidrs = _cidrs(c.ANNOTATION_EXCLUDE_CIDRS, annotations, warnings)
    exclude_ports = _ports(c.ANNOTATION_EXCLUDE_PORTS, annotations, warnings)
    include_ports = _ports(c.ANNOTATION_INCLUDE_PORTS, annotations, warnings)
    udp_ports = _ports(c.ANNOTATION_EXCLUDE_UDP_PORTS, annotations, warnings)
    udp_cidrs = _cidrs(c.ANNOTATION_EXCLUDE_UDP_CIDRS, annotations, warnings)
    if capture == "transparent":
        warnings.extend(_wide_openings(c.ANNOTATION_EXCLUDE_CIDRS, cidrs))
        warnings.extend(_wide_openings(c.ANNOTATION_EXCLUDE_UDP_CIDRS, udp_cidrs))
        if c.DNS_PORT in udp_ports:
            warnings.append(
                f"{c.ANNOTATION_EXCLUDE_UDP_PORTS}: 53 lets DNS to any server leave the pod, a "
                "channel for data; the pod's own resolvers are reachable without it"
            )
    if capture == "explicit" and (exclude_ports or include_ports):
        warnings.append("outbound port annotations only apply to transparent capture; ignored")
    if capture == "explicit" and (udp_ports or udp_cidrs):
        # Explicit capture installs no rules: UDP is not restricted there at all.
        warnings.append("outbound UDP annotations only apply to transparent capture; ignored")
    inspect_raw = annotations.get(c.ANNOTATION_INSPECT_CA)
    if inspect_raw not in (None, "true", "false"):
        # Without the CA the sidecar denies the hosts it would inspect: the stricter outcome.
        warnings.append(
            f'{c.ANNOTATION_INSPECT_CA}={inspect_raw!r} is neither "true" nor "false"; no '
            "inspection CA is mounted, so hosts the allowlist inspects are denied"
        )
    return Settings(
        capture=capture,
        configmaps=tuple(configmaps),
        mode=mode,
        exclude_cidrs=tuple(cidrs),
        exclude_ports=tuple(exclude_ports),
        include_ports=tuple(include_ports),
        exclude_udp_ports=tuple(udp_ports),
        exclude_udp_cidrs=tuple(udp_cidrs),
        inspect_ca=inspect_raw == "true",
        warnings=tuple(warnings),
    )


def _split_list(value: str | None) -> list[str]:
    if value is None:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def _valid_configmap_ref(ref: str) -> bool:
    namespace, _, name = ref.rpartition("/")
    if namespace and not _DNS_LABEL.match(namespace):
        return False
    return bool(_DNS_SUBDOMAIN.match(name))


def _cidrs(key: str, annotations: Mapping[str, str], warnings: list[str]) -> list[str]:
    cidrs: list[str] = []
    for raw in _split_list(annotations.get(key)):
        try:
            cidr = str(ipaddress.ip_network(raw, strict=False))
        except ValueError:
            warnings.append(f"{key}: {raw!r} is not a CIDR; ignored")
            continue
        if cidr not in cidrs:
            cidrs.append(cidr)
    return cidrs


# Excluded public ranges wider than these take much of the internet out of capture: a warning
# (kept, as the deployer is trusted), as the allowlist warns about its own wide CIDRs.
_WIDE_PREFIX: Final = {4: 8, 6: 32}


def _wide_openings(key: str, cidrs: list[str]) -> list[str]:
    warnings = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr)
        # Private ranges (a cluster's own, 10.0.0.0/8, fd00::/8) are not the internet.
        if network.prefixlen < _WIDE_PREFIX[network.version] and not network.is_private:
            what = "every destination" if network.prefixlen == 0 else f"all of {cidr}"
            warnings.append(
                f"{key}: {cidr} takes {what} out of egress control; name the cluster's own "
                "ranges instead"
            )
    return warnings


def _ports(key: str, annotations: Mapping[str, str], warnings: list[str]) -> list[int]:
    ports: list[int] = []
    for raw in _split_list(annotations.get(key)):
        if raw.isdigit() and 1 <= int(raw) <= 65535:
            if int(raw) not in ports:
                ports.append(int(raw))
        else:
            warnings.append(f"{key}: {raw!r} is not a port (1-65535); ignored")
    return ports


# --------------------------------------------------------------------------- identity


def owning_workload(meta: Mapping[str, Any], ctx: PodContext) -> Workload | None:
    """The workload a pod belongs to: the one being admitted/injected, else its controller owner
    (a ReplicaSet made by a Deployment is reported as the Deployment; a Job made by a CronJob
    as the CronJob)."""
    if ctx.workload is not None:
        return ctx.workload
    owners = meta.get("ownerReferences")
    if not isinstance(owners, list):
        return None
    candidates = [o for o in owners if isinstance(o, Mapping)]
    controller = next((o for o in candidates if o.get("controller") is True), None)
    owner = controller or (candidates[0] if candidates else None)
    if owner is None:
        return None
    kind, name = owner.get("kind"), owner.get("name")
    if not isinstance(kind, str) or not isinstance(name, str) or not name:
        return None
    if kind == "ReplicaSet":
        pod_hash = _labels(meta).get("pod-template-hash")
        if pod_hash and name.endswith("-" + pod_hash) and len(name) > len(pod_hash) + 1:
            return Workload("Deployment", name[: -len(pod_hash) - 1])
    if kind == "Job":
        match = _CRONJOB_JOB.match(name)
        if match:
            return Workload("CronJob", match.group("cronjob"))
    return Workload(kind, name)


def service_name(meta: Mapping[str, Any], workload: Workload | None) -> str:
    """``service.name`` in the OpenTelemetry order for Kubernetes: the
    resource.opentelemetry.io/service.name annotation, app.kubernetes.io/instance,
    app.kubernetes.io/name, the owning workload's name, the pod's name."""
    annotations = _annotations(meta)
    labels = _labels(meta)
    for value in (
        annotations.get(OTEL_SERVICE_NAME_ANNOTATION),
        labels.get(LABEL_INSTANCE),
        labels.get(LABEL_NAME),
        workload.name if workload else None,
        _str_or_none(meta.get("name")),
    ):
        if value:
            return value
    return f"$({c.ENV_POD_NAME})"  # expanded by the kubelet once the pod has its name


def _sidecar_env(meta: Mapping[str, Any], ctx: PodContext, cfg: InjectorConfig) -> list[JSON]:
    workload = owning_workload(meta, ctx)
    env: list[JSON] = [
        _field_env(c.ENV_POD_NAME, "metadata.name"),
        _field_env(c.ENV_POD_NAMESPACE, "metadata.namespace"),
        _field_env(c.ENV_NODE_NAME, "spec.nodeName"),
    ]
    if workload is not None:
        env.append({"name": c.ENV_WORKLOAD_KIND, "value": workload.kind})
        env.append({"name": c.ENV_WORKLOAD_NAME, "value": workload.name})
    attributes = [
        f"k8s.namespace.name=$({c.ENV_POD_NAMESPACE})",
        f"k8s.pod.name=$({c.ENV_POD_NAME})",
        f"k8s.node.name=$({c.ENV_NODE_NAME})",
        f"k8s.container.name={c.SIDECAR_CONTAINER}",
    ]
    if workload is not None and workload.kind in _WORKLOAD_ATTRIBUTE:
        attributes.append(f"{_WORKLOAD_ATTRIBUTE[workload.kind]}={workload.name}")
    configured = dict(cfg.otel_env)
    extra = configured.pop("OTEL_RESOURCE_ATTRIBUTES", "")
    env.append({"name": "OTEL_SERVICE_NAME", "value": service_name(meta, workload)})
    env.append(
        {
            "name": "OTEL_RESOURCE_ATTRIBUTES",
            "value": ",".join(([extra] if extra else []) + attributes),
        }
    )
    env.extend({"name": name, "value": value} for name, value in configured.items())
    return env


def _field_env(name: str, path: str) -> JSON:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


# --------------------------------------------------------------------------- containers


def _security_context_sidecar() -> JSON:
    return {
        "runAsUser": c.PROXY_UID,
        "runAsGroup": c.PROXY_GID,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, period: int, failures: int) -> JSON:
    return {
        "httpGet": {"path": path, "port": c.HEALTH_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def _wait_ready_script(timeout: int) -> str:
    # Runs in the sidecar image (python3 is there); blocks the kubelet from starting the next
    # container until the sidecar reports ready, or fails the sidecar after `timeout` seconds.
    return (
        "import sys, time, urllib.request\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        urllib.request.urlopen('http://127.0.0.1:{c.HEALTH_PORT}"
        f"{c.HEALTH_READY_PATH}', timeout=1)\n"
        "        sys.exit(0)\n"
        "    except Exception:\n"
        "        time.sleep(0.5)\n"
        "sys.exit(1)\n"
    )


def sidecar_container(
    meta: Mapping[str, Any], ctx: PodContext, cfg: InjectorConfig, settings: Settings
) -> JSON:
    args = ["--configmap", ",".join(settings.configmaps)]
    if settings.mode is not None:
        args += ["--mode", settings.mode]
    args += ["--confdir", CONFDIR]
    if settings.capture == "explicit":
        args.append("--no-transparent")
    ports: list[JSON] = [
        {"name": "egress-proxy", "containerPort": c.EXPLICIT_PORT, "protocol": "TCP"}
    ]
    if settings.capture == "transparent":
        ports.append(
            {"name": "egress-transp", "containerPort": c.TRANSPARENT_PORT, "protocol": "TCP"}
        )
    ports.append({"name": "egress-health", "containerPort": c.HEALTH_PORT, "protocol": "TCP"})
    container: JSON = {
        "name": c.SIDECAR_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["egress-sidecar", "run"],
        "args": args,
        "ports": ports,
        "env": _sidecar_env(meta, ctx, cfg),
        "resources": copy.deepcopy(cfg.sidecar_resources),
        "securityContext": _security_context_sidecar(),
        "volumeMounts": [
            {"name": CONFDIR_VOLUME, "mountPath": CONFDIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
        # Startup: poll every second for up to ready_timeout_seconds, then the kubelet restarts it.
        "startupProbe": _probe(c.HEALTH_READY_PATH, 1, max(1, cfg.ready_timeout_seconds)),
        "readinessProbe": _probe(c.HEALTH_READY_PATH, 5, 3),
        "livenessProbe": _probe(c.HEALTH_LIVE_PATH, 10, 3),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.inspect_ca:
        container["env"].append({"name": c.ENV_INSPECT_CA_DIR, "value": c.INSPECT_CA_DIR})
        container["volumeMounts"].append(
            {"name": CA_VOLUME, "mountPath": c.INSPECT_CA_DIR, "readOnly": True}
        )
    if cfg.sidecar_style == "native":
        container["restartPolicy"] = "Always"
    else:
        container["lifecycle"] = {
            "postStart": {
                "exec": {
                    "command": ["python3", "-c", _wait_ready_script(cfg.ready_timeout_seconds)]
                }
            }
        }
    return container


def init_container(cfg: InjectorConfig, settings: Settings) -> JSON:
    args = ["--proxy-uid", str(c.PROXY_UID), "--proxy-port", str(c.TRANSPARENT_PORT)]
    cidrs = _dedupe(list(cfg.cluster_cidrs) + list(settings.exclude_cidrs))
    if cidrs:
        args += ["--exclude-outbound-cidrs", ",".join(cidrs)]
    if settings.exclude_ports:
        args += ["--exclude-outbound-ports", ",".join(map(str, settings.exclude_ports))]
    if settings.include_ports:
        args += ["--include-outbound-ports", ",".join(map(str, settings.include_ports))]
    if settings.exclude_udp_ports:
        args += ["--exclude-outbound-udp-ports", ",".join(map(str, settings.exclude_udp_ports))]
    if settings.exclude_udp_cidrs:
        args += ["--exclude-outbound-udp-cidrs", ",".join(settings.exclude_udp_cidrs)]
    return {
        "name": c.INIT_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["egress-sidecar", "iptables", "apply"],
        "args": args,
        "resources": copy.deepcopy(cfg.init_resources),
        # Root with NET_ADMIN/NET_RAW only, to install the pod's iptables rules; explicit values
        # override a pod-level runAsNonRoot/runAsUser, which would otherwise stop it starting.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def ca_bundle_container(cfg: InjectorConfig) -> JSON:
    """The init step writing system roots + the egress CA certificate into the bundle emptyDir.

    It mounts the certificate-only volume, never the key. ``--optional``: without the Secret the
    bundle holds the system roots alone and the pod starts (the sidecar denies inspected hosts,
    "inspection CA not available"; every other host works)."""
    return {
        "name": CA_BUNDLE_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["egress-injector", "ca-bundle"],
        "args": ["--ca", CA_CERT_PATH, "--out", BUNDLE_PATH, "--optional"],
        "resources": copy.deepcopy(cfg.init_resources),
        "securityContext": _security_context_sidecar(),  # UID 1337, nothing else
        "volumeMounts": [
            {"name": CA_CERT_VOLUME, "mountPath": CA_CERT_DIR, "readOnly": True},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def inspect_volumes() -> list[JSON]:
    # optional: a pod whose namespace has no egress-ca yet still starts; the sidecar then denies
    # the inspected hosts (fail closed for them only). 0444: Secret files are root's and the
    # sidecar and app containers run as other UIDs; the key's volume is mounted by the sidecar
    # alone, so no other container can read it whatever the mode.
    return [
        {
            "name": CA_VOLUME,
            "secret": {
                "secretName": c.INSPECT_CA_SECRET,
                "optional": True,
                "defaultMode": 0o444,
            },
        },
        {
            "name": CA_CERT_VOLUME,
            "secret": {
                "secretName": c.INSPECT_CA_SECRET,
                "optional": True,
                "defaultMode": 0o444,
                "items": [{"key": "tls.crt", "path": "ca.crt"}],
            },
        },
        {"name": BUNDLE_VOLUME, "emptyDir": {"sizeLimit": "4Mi"}},
    ]


def _add_trust(container: JSON) -> list[str]:
    """Mount the CA certificate and the bundle read-only and point the trust-store variables at
    them, keeping any variable the container sets itself. Returns the warnings."""
    name = container.get("name")
    warnings: list[str] = []
    mounts = container.get("volumeMounts")
    if not isinstance(mounts, list):
        mounts = []
    taken = {m.get("mountPath") for m in mounts if isinstance(m, Mapping)}
    for volume, path in ((CA_CERT_VOLUME, CA_CERT_DIR), (BUNDLE_VOLUME, BUNDLE_DIR)):
        if path in taken:
            warnings.append(
                f"container {name}: it mounts {path} itself; the egress CA is not there"
            )
            continue
        mounts.append({"name": volume, "mountPath": path, "readOnly": True})
    container["volumeMounts"] = mounts
    env = container.get("env")
    if not isinstance(env, list):
        env = []
    present = {e.get("name") for e in env if isinstance(e, Mapping)}
    kept = [var for var, _ in TRUST_ENV if var in present]
    env.extend({"name": var, "value": value} for var, value in TRUST_ENV if var not in present)
    container["env"] = env
    if kept:
        warnings.append(
            f"container {name}: {', '.join(kept)} it sets itself kept; for inspected hosts that "
            f"trust store must hold the egress CA ({CA_CERT_PATH})"
        )
    if container.get("envFrom"):
        warnings.append(
            f"container {name}: trust-store variables from envFrom are overridden by the "
            "injected ones"
        )
    return warnings


def _shows_key(source: Any, name_key: str) -> bool:
    """A Secret volume or projection of the inspection CA that can show tls.key."""
    if not isinstance(source, Mapping) or source.get(name_key) != c.INSPECT_CA_SECRET:
        return False
    items = source.get("items")
    if not isinstance(items, list) or not items:
        return True
    return any(isinstance(i, Mapping) and i.get("key") == "tls.key" for i in items)


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    """The mappings of a list, for fields the pod shape check does not cover."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _ca_key_warnings(volumes: list[JSON], containers: list[JSON]) -> list[str]:
    """The app's own ways to the inspection CA's key (a volume of the whole Secret, an env value
    or envFrom of it): the injector never makes one, but says so when the pod does, since the key
    lets its holder impersonate every inspected host to the pods that trust the CA."""
    by_name = {v.get("name"): v for v in _mappings(volumes)}
    warnings: list[str] = []
    for container in containers:
        ways: list[str] = []
        for mount in _mappings(container.get("volumeMounts")):
            volume = by_name.get(mount.get("name"))
            if volume is None:
                continue
            projected = volume.get("projected")
            sources = _mappings(projected.get("sources")) if isinstance(projected, Mapping) else []
            if _shows_key(volume.get("secret"), "secretName") or any(
                _shows_key(source.get("secret"), "name") for source in sources
            ):
                ways.append(f"volume {volume.get('name')}")
        for env in _mappings(container.get("env")):
            value_from = env.get("valueFrom")
            ref = value_from.get("secretKeyRef") if isinstance(value_from, Mapping) else None
            if (
                isinstance(ref, Mapping)
                and ref.get("name") == c.INSPECT_CA_SECRET
                and ref.get("key") == "tls.key"
            ):
                ways.append(f"env {env.get('name')}")
        for source in _mappings(container.get("envFrom")):
            ref = source.get("secretRef")
            if isinstance(ref, Mapping) and ref.get("name") == c.INSPECT_CA_SECRET:
                ways.append("envFrom")
        if ways:
            warnings.append(
                f"container {container.get('name')}: {', '.join(ways)} gives it the key of the "
                f"Secret {c.INSPECT_CA_SECRET} (the HTTPS inspection CA); give it tls.crt alone"
            )
    return warnings


def _dedupe(items: list[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _no_proxy(cfg: InjectorConfig, settings: Settings) -> str:
    return ",".join(
        _dedupe(list(cfg.no_proxy_hosts) + list(cfg.cluster_cidrs) + list(settings.exclude_cidrs))
    )


def _add_proxy_env(container: JSON, no_proxy: str) -> bool:
    """Add HTTP(S)_PROXY/NO_PROXY in both cases, except where the user set the variable (in either
    case: tools disagree on which case wins, so a half-set pair would be ambiguous). True when a
    user's variable was kept."""
    env = container.get("env")
    if not isinstance(env, list):
        env = []
    present = {e.get("name") for e in env if isinstance(e, Mapping)}
    kept = False
    values = {"HTTP_PROXY": PROXY_URL, "HTTPS_PROXY": PROXY_URL, "NO_PROXY": no_proxy}
    for upper in PROXY_ENV_NAMES:
        if upper in present or upper.lower() in present:
            kept = True
            continue
        env.append({"name": upper, "value": values[upper]})
        env.append({"name": upper.lower(), "value": values[upper]})
    container["env"] = env
    return kept


# --------------------------------------------------------------------------- injection


def inject_pod(pod: Mapping[str, Any], ctx: PodContext, cfg: InjectorConfig) -> PodResult:
    """Inject the sidecar into a Pod or a pod template (a mapping with metadata and spec).

    Returns a new object (the input is not modified); unchanged when not injected. Raises
    NotAPodError when the object has no pod shape.
    """
    inject, reason = decide(pod, ctx, cfg)
    if not inject:
        unprotected = _unprotected(pod, ctx, cfg)
        return PodResult(
            pod=copy.deepcopy(dict(pod)),
            injected=False,
            reason=reason,
            warnings=unprotected,
            risks=unprotected,
        )
    out: JSON = copy.deepcopy(dict(pod))
    meta: JSON = out.setdefault("metadata", {})
    if not isinstance(meta, dict):  # checked by decide(); keeps mypy and readers sure
        raise NotAPodError("metadata is not a mapping")
    spec: JSON = out["spec"]
    annotations = _annotations(meta)
    settings = read_settings(annotations, cfg)
    warnings = list(settings.warnings)

    init: list[JSON] = list(spec.get("initContainers") or [])
    containers: list[JSON] = list(spec["containers"])
    volumes: list[JSON] = list(spec.get("volumes") or [])
    taken = {x.get("name") for x in init + containers}
    ours = {c.SIDECAR_CONTAINER, c.INIT_CONTAINER}
    if settings.inspect_ca:
        ours.add(CA_BUNDLE_CONTAINER)
    clash = taken & ours
    if clash:
        return PodResult(
            pod=copy.deepcopy(dict(pod)),
            injected=False,
            reason=f"container name {sorted(str(n) for n in clash)[0]} is already used by the pod",
        )
    vclash = {v.get("name") for v in volumes} & (
        set(INJECTED_VOLUMES) | (set(INSPECT_VOLUMES) if settings.inspect_ca else set())
    )
    if vclash:
        return PodResult(
            pod=copy.deepcopy(dict(pod)),
            injected=False,
            reason=f"volume name {sorted(str(n) for n in vclash)[0]} is already used by the pod",
        )

    user_init = copy.deepcopy(init)
    user_containers = copy.deepcopy(containers)
    if settings.capture == "explicit":
        no_proxy = _no_proxy(cfg, settings)
        for container in user_init + user_containers:
            if _add_proxy_env(container, no_proxy):
                warnings.append(
                    f"container {container.get('name')}: proxy variables it sets itself were kept"
                )
            if container.get("envFrom"):
                warnings.append(
                    f"container {container.get('name')}: proxy variables from envFrom are "
                    "overridden by the injected ones"
                )
        # Said once: no privilege setting of a container can make explicit capture a boundary.
        warnings.append(EXPLICIT_CAPTURE)
        risks: list[str] = []
    else:
        risks = transparent_risks(spec, user_init + user_containers)
        warnings.extend(risks)
    warnings.extend(_ca_key_warnings(volumes, user_init + user_containers))
    if settings.inspect_ca:
        for container in user_init + user_containers:
            warnings.extend(_add_trust(container))
        if spec.get("shareProcessNamespace") is True:
            warnings.append(
                "shareProcessNamespace: app containers can reach the sidecar's processes, and "
                "through them the inspection CA's key; turn it off in pods that inspect"
            )

    sidecar = sidecar_container(meta, ctx, cfg, settings)
    injected_init: list[JSON] = []
    if settings.capture == "transparent":
        injected_init.append(init_container(cfg, settings))
    if settings.inspect_ca:
        injected_init.append(ca_bundle_container(cfg))
    if cfg.sidecar_style == "native":
        injected_init.append(sidecar)
        spec["initContainers"] = injected_init + user_init
        spec["containers"] = user_containers
    else:
        if injected_init or user_init:
            spec["initContainers"] = injected_init + user_init
        spec["containers"] = [sidecar, *user_containers]
        if user_init and settings.capture == "transparent":
            warnings.append(
                "container sidecar style: user init containers run before the sidecar, so their "
                "outbound connections are refused (use the native style)"
            )
        if spec.get("restartPolicy") in ("Never", "OnFailure"):
            warnings.append(
                "container sidecar style: the sidecar never exits, so this Job's pods never "
                "complete (use the native style, Kubernetes >= 1.29)"
            )
    volumes.append({"name": CONFDIR_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}})
    volumes.append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}})
    injected_volumes = [CONFDIR_VOLUME, TMP_VOLUME]
    if settings.inspect_ca:
        volumes.extend(inspect_volumes())
        injected_volumes.extend(INSPECT_VOLUMES)
    if spec.get("automountServiceAccountToken") is False:
        # The app opted out of an API token, but the sidecar needs one to read its allowlist
        # ConfigMap: give the sidecar alone the volume the ServiceAccount admission would mount.
        volumes.append(_token_volume())
        sidecar["volumeMounts"].append(
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_PATH, "readOnly": True}
        )
        injected_volumes.append(TOKEN_VOLUME)
    spec["volumes"] = volumes

    status: JSON = {
        "version": __version__,
        "image": cfg.image,
        "style": cfg.sidecar_style,
        "capture": settings.capture,
        "allowlist": list(settings.configmaps),
        "mode": settings.mode or "default",
        "initContainers": [x["name"] for x in injected_init],
        "containers": [] if cfg.sidecar_style == "native" else [c.SIDECAR_CONTAINER],
        "volumes": injected_volumes,
    }
    if settings.inspect_ca:
        status["inspectCA"] = True
    new_annotations = dict(meta.get("annotations") or {})
    new_annotations[c.ANNOTATION_STATUS] = json.dumps(status, separators=(",", ":"))
    meta["annotations"] = new_annotations
    return PodResult(
        pod=out, injected=True, reason=reason, warnings=tuple(warnings), risks=tuple(risks)
    )


def _unprotected(pod: Mapping[str, Any], ctx: PodContext, cfg: InjectorConfig) -> tuple[str, ...]:
    """The warning for a pod that asked for the sidecar but cannot have it (host network), so
    that it does not start without egress control silently. Only called after decide()."""
    meta, spec = _split_pod(pod)
    annotations = _annotations(meta)
    namespace = ctx.namespace or _str_or_none(meta.get("namespace"))
    if (
        spec.get("hostNetwork") is True
        and c.ANNOTATION_STATUS not in annotations
        and namespace not in cfg.excluded_namespaces
        and _opted_in(annotations, ctx)[0]
    ):
        return (HOST_NETWORK,)
    return ()


def _token_volume() -> JSON:
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }


# --------------------------------------------------------------------------- workloads


def pod_template(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod template of a workload object, or None when its kind has none."""
    path = TEMPLATE_PATHS.get(str(obj.get("kind")))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node if isinstance(node, Mapping) else None


def _template_for_update(obj: JSON, kind: str) -> JSON:
    path = TEMPLATE_PATHS[kind]
    node: JSON = obj
    for key in path:
        child = node.get(key)
        if child is None:
            child = {}
            node[key] = child
        if not isinstance(child, dict):
            raise NotAPodError(f"{'.'.join(path)} is not a mapping")
        node = child
    return node


def workload_annotations(meta: Mapping[str, Any]) -> dict[str, str]:
    """The workload's own egress-sidecar.io/* annotations that are copied into its template."""
    return {
        k: v
        for k, v in _annotations(meta).items()
        if k.startswith(c.PREFIX) and k not in (c.ANNOTATION_STATUS, ANNOTATION_FROM_WORKLOAD)
    }


def sync_workload_annotations(
    obj: Mapping[str, Any], kind: str | None = None
) -> tuple[JSON, list[str]]:
    """Copy a workload's egress-sidecar.io/* annotations into its pod template (the workload
    wins over the template), and remove those it copied before but no longer carries.

    ``kind`` defaults to the object's own. Returns the new object and the keys that changed
    (empty: nothing to do).
    """
    kind = kind or str(obj.get("kind"))
    if kind not in TEMPLATE_PATHS:
        raise NotAPodError(f"kind {kind!r} has no pod template")
    out: JSON = copy.deepcopy(dict(obj))
    meta = out.get("metadata") if isinstance(out.get("metadata"), Mapping) else {}
    wanted = workload_annotations(meta or {})
    template = _template_for_update(out, kind)
    tmeta = template.get("metadata")
    if tmeta is None:
        tmeta = {}
    if not isinstance(tmeta, dict):
        raise NotAPodError("the pod template's metadata is not a mapping")
    tannotations = dict(_annotations(tmeta))
    previously = set(_split_list(tannotations.get(ANNOTATION_FROM_WORKLOAD)))
    changed: list[str] = []
    for key in sorted(previously - set(wanted)):
        if key in tannotations:
            del tannotations[key]
            changed.append(key)
    for key, value in sorted(wanted.items()):
        if tannotations.get(key) != value:
            tannotations[key] = value
            changed.append(key)
    bookkeeping = ",".join(sorted(wanted))
    if bookkeeping:
        if tannotations.get(ANNOTATION_FROM_WORKLOAD) != bookkeeping:
            tannotations[ANNOTATION_FROM_WORKLOAD] = bookkeeping
            changed.append(ANNOTATION_FROM_WORKLOAD)
    elif ANNOTATION_FROM_WORKLOAD in tannotations:
        del tannotations[ANNOTATION_FROM_WORKLOAD]
        changed.append(ANNOTATION_FROM_WORKLOAD)
    if not changed:
        return copy.deepcopy(dict(obj)), []
    tmeta["annotations"] = tannotations
    template["metadata"] = tmeta
    return out, changed


def inject_workload(
    obj: Mapping[str, Any], cfg: InjectorConfig, namespace_injection: NamespaceInjection = None
) -> PodResult:
    """Offline injection of a workload: sync its annotations into the template, then inject the
    template as a pod of that workload. ``pod`` in the result is the whole workload object."""
    synced, _ = sync_workload_annotations(obj)
    meta = synced.get("metadata") if isinstance(synced.get("metadata"), Mapping) else {}
    name = (meta or {}).get("name")
    namespace = (meta or {}).get("namespace")
    kind = str(synced.get("kind"))
    ctx = PodContext(
        namespace=namespace if isinstance(namespace, str) and namespace else None,
        namespace_injection=namespace_injection,
        workload=Workload(kind, name) if isinstance(name, str) and name else None,
    )
    template = _template_for_update(synced, kind)
    result = inject_pod(template, ctx, cfg)
    if result.injected:
        template.clear()
        template.update(result.pod)
    return PodResult(
        pod=synced,
        injected=result.injected,
        reason=result.reason,
        warnings=result.warnings,
        risks=result.risks,
    )


# --------------------------------------------------------------------------- patch


def make_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[JSON]:
    """The RFC 6902 JSON Patch turning ``before`` into ``after``, derived by diffing."""
    ops: list[JSON] = jsonpatch.make_patch(dict(before), dict(after)).patch
    return ops
