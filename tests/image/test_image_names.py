"""One image name everywhere: what `make image` builds is what config/ runs and what the injector
injects (a kind or minikube cluster uses a loaded image only under the name the pods ask for)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from injector.config import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parents[2]


def _match(path: str, pattern: str) -> str:
    m = re.search(pattern, (REPO / path).read_text(), re.MULTILINE)
    assert m is not None, f"{path}: no line matches {pattern!r}"
    return m.group(1)


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("Makefile", r"^IMAGE \?= (\S+)$"),
        ("scripts/build-image", r"^IMAGE=\$\{IMAGE:-(\S+)\}$"),
        ("scripts/bench-image", r"^image=\$\{IMAGE:-(\S+)\}$"),
        ("scripts/e2e-kind", r"^IMAGE=(\S+)$"),
        ("config/injector/deployment.yaml", r"^\s+image: (\S+)$"),
    ],
)
def test_the_image_name_agrees(path: str, pattern: str) -> None:
    assert _match(path, pattern) == DEFAULT_IMAGE


def test_the_injector_config_and_the_tag_agree() -> None:
    config = yaml.safe_load((REPO / "config/injector/config.yaml").read_text())
    assert config["image"] == DEFAULT_IMAGE
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert DEFAULT_IMAGE.rsplit(":", 1)[1] == version
