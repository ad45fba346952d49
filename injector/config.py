"""The injector's configuration: what to inject, parsed from a YAML document (pure, no I/O).

The document is shipped in config/ as the ConfigMap ``egress-injector-config`` and read by
``egress-injector serve|inject --config PATH``. Every key is optional; unknown keys are rejected so
that a typo does not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

SidecarStyle = Literal["native", "container"]
Capture = Literal["transparent", "explicit"]

DEFAULT_IMAGE: Final = "ghcr.io/egress-sidecar/egress-sidecar:0.1.0"
DEFAULT_INJECTOR_NAMESPACE: Final = "egress-system"
# Cluster-internal destinations are not sent through the proxy (pod-to-pod and pod-to-Service
# traffic is NetworkPolicy's job, and the proxy's private-address guard would deny it). The RFC 1918
# and unique-local ranges cover the usual pod and Service CIDRs; narrow them to your cluster's.
DEFAULT_CLUSTER_CIDRS: Final = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
SYSTEM_NAMESPACES: Final = frozenset({"kube-system", "kube-public", "kube-node-lease"})

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """The injector configuration document is invalid; the message names the key at fault."""


def _default_sidecar_resources() -> dict[str, dict[str, str]]:
    # FIELD-NOTES: mitmdump with an allowlist addon idles at ~75 MB RSS, ~140 MB under load.
    return {
        "requests": {"cpu": "50m", "memory": "96Mi"},
        "limits": {"memory": "256Mi"},
    }


def _default_init_resources() -> dict[str, dict[str, str]]:
    # A short Python process that runs iptables-restore.
    return {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"cpu": "500m", "memory": "128Mi"},
    }


@dataclass(frozen=True)
class InjectorConfig:
    """What the injector puts into a pod, and which namespaces it never touches."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    sidecar_style: SidecarStyle = "native"
    default_capture: Capture = "transparent"
    sidecar_resources: dict[str, dict[str, str]] = field(default_factory=_default_sidecar_resources)
    init_resources: dict[str, dict[str, str]] = field(default_factory=_default_init_resources)
    cluster_cidrs: tuple[str, ...] = DEFAULT_CLUSTER_CIDRS
    # NO_PROXY names for explicit capture (cluster-internal DNS names), before the CIDRs.
    no_proxy_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1", ".svc", ".cluster.local")
    otel_env: tuple[tuple[str, str], ...] = ()
    injector_namespace: str = DEFAULT_INJECTOR_NAMESPACE
    # Seconds the container-style postStart hook waits for the sidecar to become ready.
    ready_timeout_seconds: int = 120
    # Refuse, rather than warn about, pods whose app containers can bypass capture (privileged,
    # NET_ADMIN, NET_RAW, a way to UID 1337) or that opted in on the host network. Off by
    # default: most images run as root with the runtime's capabilities, and a warning never
    # breaks a workload.
    refuse_capture_bypass: bool = False

    def __post_init__(self) -> None:
        if self.sidecar_style not in ("native", "container"):
            raise ConfigError(f"sidecarStyle: {self.sidecar_style!r} is not native or container")
        if self.default_capture not in ("transparent", "explicit"):
            raise ConfigError(
                f"defaultCapture: {self.default_capture!r} is not transparent or explicit"
            )
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"image: {self.image!r} is not an image reference")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(
                f"imagePullPolicy: {self.image_pull_policy!r} is not Always, IfNotPresent or Never"
            )
        for cidr in self.cluster_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"clusterCIDRs: {cidr!r} is not a CIDR") from exc
        for key, resources in (
            ("sidecarResources", self.sidecar_resources),
            ("initResources", self.init_resources),
        ):
            _check_resources(key, resources)
        for name, _value in self.otel_env:
            if not name.startswith("OTEL_") or not _ENV_NAME.match(name):
                raise ConfigError(f"otelEnv: {name!r} is not an OTEL_* variable name")
            if name == "OTEL_SERVICE_NAME":
                raise ConfigError(
                    "otelEnv: OTEL_SERVICE_NAME is derived per workload and cannot be set globally"
                )
        if not _DNS_LABEL.match(self.injector_namespace):
            raise ConfigError(f"injectorNamespace: {self.injector_namespace!r} is not a namespace")
        if not 1 <= self.ready_timeout_seconds <= 3600:
            raise ConfigError(f"readyTimeoutSeconds: {self.ready_timeout_seconds} not in 1..3600")

    @property
    def excluded_namespaces(self) -> frozenset[str]:
        return SYSTEM_NAMESPACES | {self.injector_namespace}


def _check_resources(key: str, resources: dict[str, dict[str, str]]) -> None:
    for section, values in resources.items():
        if section not in ("requests", "limits"):
            raise ConfigError(f"{key}: {section!r} is not requests or limits")
        for resource, quantity in values.items():
            if not _QUANTITY.match(quantity):
                raise ConfigError(f"{key}.{section}.{resource}: {quantity!r} is not a quantity")


_KEYS: Final = {
    "image": "image",
    "imagePullPolicy": "image_pull_policy",
    "sidecarStyle": "sidecar_style",
    "defaultCapture": "default_capture",
    "sidecarResources": "sidecar_resources",
    "initResources": "init_resources",
    "clusterCIDRs": "cluster_cidrs",
    "noProxy": "no_proxy_hosts",
    "otelEnv": "otel_env",
    "injectorNamespace": "injector_namespace",
    "readyTimeoutSeconds": "ready_timeout_seconds",
    "refuseCaptureBypass": "refuse_capture_bypass",
}


def config_from_dict(doc: Any) -> InjectorConfig:
    """Build an InjectorConfig from a parsed YAML mapping (camelCase keys, see config/)."""
    if doc is None:
        return InjectorConfig()
    if not isinstance(doc, dict):
        raise ConfigError(f"injector configuration must be a mapping, got {type(doc).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        attr = _KEYS.get(str(key))
        if attr is None:
            raise ConfigError(f"unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
        kwargs[attr] = _convert(str(key), value)
    return InjectorConfig(**kwargs)


def _convert(key: str, value: Any) -> Any:
    if key in ("clusterCIDRs", "noProxy"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return tuple(value)
    if key == "otelEnv":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of OTEL_* names to strings")
        return tuple((str(k), str(v)) for k, v in value.items())
    if key in ("sidecarResources", "initResources"):
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ConfigError(f"{key}: must be a mapping with requests/limits mappings")
        return {str(s): {str(r): str(q) for r, q in v.items()} for s, v in value.items()}
    if key == "refuseCaptureBypass":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false")
        return value
    if key == "readyTimeoutSeconds":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: must be an integer")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string")
    return value
