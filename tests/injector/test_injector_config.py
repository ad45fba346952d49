"""The injector configuration: defaults, the shipped file, and errors that name the key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.cli import load_config
from injector.config import DEFAULT_IMAGE, ConfigError, InjectorConfig, config_from_dict
from tests.injector.support import REPO


def test_defaults() -> None:
    cfg = config_from_dict(None)
    assert cfg == InjectorConfig()
    assert cfg.image == DEFAULT_IMAGE
    assert cfg.sidecar_style == "native" and cfg.default_capture == "transparent"
    assert cfg.excluded_namespaces == {
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "egress-system",
    }


def test_the_shipped_configuration_loads() -> None:
    doc = yaml.safe_load((REPO / "config" / "injector" / "config.yaml").read_text())
    cfg = config_from_dict(doc)
    assert dict(cfg.otel_env)["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert cfg.injector_namespace == "egress-system"
    assert cfg.refuse_capture_bypass is False  # warnings by default: never breaks a workload
    assert config_from_dict({"refuseCaptureBypass": True}).refuse_capture_bypass is True


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a mapping"),
        ({"imgae": "x"}, "unknown key 'imgae'"),
        ({"sidecarStyle": "sidecar"}, "sidecarStyle"),
        ({"defaultCapture": "both"}, "defaultCapture"),
        ({"image": "has space"}, "image"),
        ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy"),
        ({"clusterCIDRs": ["10.0.0.0/33"]}, "clusterCIDRs: '10.0.0.0/33'"),
        ({"clusterCIDRs": "10.0.0.0/8"}, "clusterCIDRs: must be a list"),
        ({"otelEnv": {"JAVA_OPTS": "x"}}, "otelEnv: 'JAVA_OPTS'"),
        ({"otelEnv": {"OTEL_SERVICE_NAME": "x"}}, "derived per workload"),
        ({"sidecarResources": {"requests": {"cpu": "lots"}}}, "sidecarResources.requests.cpu"),
        ({"initResources": {"wants": {}}}, "initResources: 'wants'"),
        ({"injectorNamespace": "Egress"}, "injectorNamespace"),
        ({"readyTimeoutSeconds": 0}, "readyTimeoutSeconds"),
        ({"readyTimeoutSeconds": "10"}, "must be an integer"),
        ({"refuseCaptureBypass": "yes"}, "refuseCaptureBypass: must be true or false"),
        ({"refuseCaptureBypass": 1}, "refuseCaptureBypass: must be true or false"),
    ],
)
def test_errors_name_the_key(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_dict(doc)


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(image=kw.get("image"), sidecar_style=kw.get("sidecar_style"))


def test_load_config_from_a_configmap_manifest_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "egress-injector-config"},
                "data": {"config.yaml": "image: registry.local/egress:1\nsidecarStyle: native\n"},
            }
        )
    )
    cfg = load_config(str(path), _args(sidecar_style="container"))
    assert cfg.image == "registry.local/egress:1"
    assert cfg.sidecar_style == "container"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image: [unclosed", "not YAML"),
        ("kind: ConfigMap\ndata: {}\n", "no data key config.yaml"),
        ("sidecarStyle: nope\n", "sidecarStyle"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path), _args())
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"), _args())
