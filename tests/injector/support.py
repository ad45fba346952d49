"""Helpers shared by the injector tests: configurations, schema validation, paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import kubernetes_validate

from injector.config import InjectorConfig

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
