"""Helpers shared by the injector tests: configurations, schema validation, paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import kubernetes_validate

from injector.config import InjectorConfig
from sidecar import contract as c

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parents[1]
GOLDEN: Final = HERE / "golden"
# Kept in the repository (sources and licences in its README): a clone alone runs every test.
REAL_WORLD: Final = REPO / "tests" / "testdata" / "real-world-manifests"
# A current Kubernetes release (native sidecars GA since 1.33), and the last release before native
# sidecars were on by default, for the container style.
K8S_VERSION: Final = "1.34"
K8S_VERSION_OLD: Final = "1.28"
UPDATE_GOLDEN: Final = os.environ.get("UPDATE_GOLDEN") == "1"

OTEL_ENV: Final = (
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger-collector.observability:4317"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
)


def config(style: str = "native", **kwargs: Any) -> InjectorConfig:
    kwargs.setdefault("otel_env", OTEL_ENV)
    return InjectorConfig(sidecar_style=style, **kwargs)  # type: ignore[arg-type]


def validate(doc: dict[str, Any], version: str = K8S_VERSION) -> None:
    """Strict OpenAPI-schema validation (offline: the schemas ship with kubernetes-validate).
    Raises with the path of the first offending field."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: {where}: {exc.message}"
        ) from exc


def _exposes_key(source: Any, name_key: str) -> bool:
    """A Secret volume or projection of the inspection CA that can show tls.key: the whole
    Secret (no items), or items naming the key."""
    if not isinstance(source, dict) or source.get(name_key) != c.INSPECT_CA_SECRET:
        return False
    items = source.get("items")
    if not items:
        return True
    return any(item.get("key") == "tls.key" for item in items)


def ca_key_exposures(spec: dict[str, Any]) -> list[str]:
    """Every way a container other than the sidecar could read the inspection CA's key: a volume
    of the Secret (or a projection of it) that can show tls.key, an env value from it, envFrom
    it. Empty = the key reaches the sidecar alone."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    found: list[str] = []
    for container in (spec.get("initContainers") or []) + spec["containers"]:
        name = container["name"]
        if name == c.SIDECAR_CONTAINER:
            continue
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            sources = [volume.get("secret")] + [
                s.get("secret") for s in (volume.get("projected") or {}).get("sources") or []
            ]
            if _exposes_key(volume.get("secret"), "secretName") or any(
                _exposes_key(s, "name") for s in sources[1:]
            ):
                found.append(f"container {name}: volume {mount['name']} can show tls.key")
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") == c.INSPECT_CA_SECRET and ref.get("key") == "tls.key":
                found.append(f"container {name}: env {env['name']} is tls.key")
        for env_from in container.get("envFrom") or []:
            if (env_from.get("secretRef") or {}).get("name") == c.INSPECT_CA_SECRET:
                found.append(f"container {name}: envFrom the whole Secret")
    return found
