"""The soak end to end in a tiny configuration (real sidecar, real nginx, real clients): it
checks that the harness works and keeps it from rotting, not the sidecar's stamina."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.soak.__main__ import main
from bench.soak.model import HOSTS, PolicyVersion, Role, versions
from bench.soak.runner import Settings, run

TINY = ["--duration=3", "--clients=20", "--flip-interval=1", "--warmup=0.5", "--settle=0.5"]


@pytest.mark.timeout(40)
def test_a_tiny_soak_passes_and_reports_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soak.json"
    code = main([*TINY, f"--out={out}"])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["wrong"] == 0
    assert data["flips"] >= 2
    assert set(data["decisions_by_version"]) == {"A", "B"}
    targets = data["by_target"]
    assert set(targets) == {f"{s} {r.value}" for s in ("http", "https") for r in Role}
    for scheme in ("http", "https"):
        # at 20 clients nothing should fail; each host gets what its versions say
        assert set(targets[f"{scheme} both"]) == {"allowed"}, targets
        assert set(targets[f"{scheme} neither"]) == {"denied"}, targets
        for flipping in ("only-a", "only-b"):
            assert set(targets[f"{scheme} {flipping}"]) <= {"allowed", "denied"}, targets
    res = data["resources"]
    assert res["start"]["rss_mib"] > 0 and res["start"]["fds"] > 0
    assert res["peak_fds"] >= res["start"]["fds"]
    assert data["requests"] == sum(data["by_outcome"].values()) > 0
    assert "| wrong decisions | 0 |" in printed.out and printed.out.rstrip().endswith("PASS")


def _misread(ports: Sequence[int]) -> list[PolicyVersion]:
    """The real files, but an expectation that is wrong for version B: it "allows" only-a."""
    a, b = versions(ports)
    return [a, PolicyVersion(b.label, b.text, b.allows | {HOSTS[Role.ONLY_A]})]


@pytest.mark.timeout(40)
def test_decisions_against_the_named_version_are_caught(tmp_path: Path) -> None:
    settings = Settings(
        seconds=2.5, clients=8, flip_interval=0.8, warmup_seconds=0, settle_seconds=0.3
    )
    report = run(settings, log=lambda _: None, make_versions=_misread)
    assert not report.passed
    assert report.wrong > 0
    assert f"wrong decisions: {report.wrong}" in report.problems
    only_a = HOSTS[Role.ONLY_A]
    assert all(
        f"deny of {only_a} by version B, which allows it" in w for w in report.wrong_examples
    )
