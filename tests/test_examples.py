"""The examples a newcomer applies must be valid: Kubernetes schema and our own allowlist format."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sidecar.policy.parse import parse_allowlist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
K8S_VERSION = "1.31.0"


@pytest.mark.parametrize(
    "name", ["jaeger.yaml", "demo-workload.yaml", "allowlist.yaml", "bypass-pods.yaml"]
)
def test_example_manifests_validate_against_the_kubernetes_schema(name: str) -> None:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_example_allowlist_is_valid_and_decides_the_readme_examples() -> None:
    policy = parse_allowlist((EXAMPLES / "allowlist.yaml").read_text(), source="example")
    from sidecar.policy.model import Destination, Verdict

    assert policy.decide(Destination("api.github.com", 443)).verdict is Verdict.ALLOW
    assert policy.decide(Destination("evil.example", 443)).verdict is Verdict.DENY
    assert policy.decide(Destination("upload.googleapis.com", 443)).verdict is Verdict.DENY
    assert policy.decide(Destination("storage.googleapis.com", 443)).verdict is Verdict.ALLOW
