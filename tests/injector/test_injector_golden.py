"""Golden files: annotated inputs -> injected outputs, for every capture mode, sidecar style and
kind. Regenerate with ``UPDATE_GOLDEN=1 pytest tests/injector/test_injector_golden.py`` and review
the diff by eye."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from injector.offline import inject_text
from tests.injector.support import (
    GOLDEN,
    K8S_VERSION,
    K8S_VERSION_OLD,
    UPDATE_GOLDEN,
    config,
    validate,
)

INPUTS = sorted((GOLDEN / "input").glob("*.yaml"))
STYLES = ("native", "container")


def test_every_kind_and_capture_has_an_input() -> None:
    names = {p.stem for p in INPUTS}
    for kind in ("pod", "deployment", "statefulset", "daemonset", "job", "cronjob"):
        for capture in ("transparent", "explicit"):
            assert f"{kind}-{capture}" in names


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_golden(source: Path, style: str) -> None:
    output, report = inject_text(source.read_text(), config(style), namespace_injection=None)
    assert len(report.injected) == 1, report
    target = GOLDEN / "output" / f"{source.stem}.{style}.yaml"
    # what `inject` prints as warning: lines, reviewed like the manifests
    warnings = GOLDEN / "output" / f"{source.stem}.{style}.warnings.txt"
    warned = "".join(f"{w}\n" for w in report.warnings)
    if UPDATE_GOLDEN:
        target.write_text(output)
        warnings.write_text(warned)
    for path, got in ((target, output), (warnings, warned)):
        assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
        assert got == path.read_text(), f"{path} differs; review, then UPDATE_GOLDEN=1"
    for doc in yaml.safe_load_all(output):
        validate(doc, K8S_VERSION)
        if style == "container":
            validate(doc, K8S_VERSION_OLD)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_golden_is_a_fixed_point(source: Path, style: str) -> None:
    once, _ = inject_text(source.read_text(), config(style), namespace_injection=None)
    twice, report = inject_text(once, config(style), namespace_injection=None)
    assert twice == once
    assert report.injected == []
    assert all("already injected" in s for s in report.skipped)
