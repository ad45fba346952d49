"""docs/troubleshooting.md: every reason the sidecar can emit is explained (and nothing else),
and every command on the page runs — against a real sidecar on examples/allowlist.yaml, and
`kubectl egress` through the real kubectl against the API stand-in holding that allowlist —
printing what the page shows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sidecar import answers
from sidecar.policy.model import Reason
from tests.docs.doc_commands import ROOT, examples, run_examples
from tests.kubectl.world import NS, deployment
from tests.support.kubeapi import FakeKubeAPI
from tests.support.sidecar import Sidecar, start_sidecar

PAGE = ROOT / "docs" / "troubleshooting.md"
EXAMPLE = ROOT / "examples" / "allowlist.yaml"


def _sections() -> dict[str, str]:
    """The page's reason sections: `### \\`reason\\`` -> its text."""
    text = PAGE.read_text(encoding="utf-8")
    parts = re.split(r"^### `([^`]+)`\n", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _never_blocking() -> set[str]:
    text = PAGE.read_text(encoding="utf-8").split("### Reasons that never block", 1)[1]
    text = text.split("\n## ", 1)[0]
    return set(re.findall(r"^- `([^`]+)`", text, flags=re.M))


def test_every_reason_the_code_emits_is_on_the_page() -> None:
    # Every decision carries a sidecar.policy.model.Reason: the enum is the list of what the
    # policy core, the fast path, the mitmproxy tier and the DNS listener can say.
    in_code = {r.value for r in Reason}
    sections = _sections()
    on_page = set(sections) | _never_blocking()
    missing = in_code - on_page
    assert not missing, f"reasons the sidecar emits that docs/troubleshooting.md lacks: {missing}"
    assert on_page <= in_code, f"reasons on the page the code never emits: {on_page - in_code}"
    for reason, text in sections.items():
        assert "**What to do:**" in text, f"{reason}: no 'What to do'"


def test_every_upstream_failure_phrase_is_on_the_page() -> None:
    # What x-egress-reason says when an allowed call's upstream failed (sidecar.answers).
    text = PAGE.read_text(encoding="utf-8").split("## Allowed, but the upstream failed", 1)[1]
    listed = set(re.findall(r"^- `([^`]+)`", text, flags=re.M))
    phrases = {*answers._FAILURE_PHRASES.values(), answers.failure_phrase(None)}
    assert listed == phrases


def test_reasons_used_in_the_code_are_all_members() -> None:
    # A reason spelled outside the enum would escape the check above.
    names = {m.name for m in Reason}
    used: set[str] = set()
    for path in (ROOT / "sidecar").rglob("*.py"):
        used.update(re.findall(r"\bReason\.([A-Z_]+)\b", path.read_text(encoding="utf-8")))
    assert used and used <= names


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The API stand-in: namespace shop, deploy/web opted in, its allowlist the example's."""
    tmp = tmp_path_factory.mktemp("troubleshooting")
    api = FakeKubeAPI()
    api.start()
    try:
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig", namespace=NS)
        api.put_object("namespaces", {"metadata": {"name": NS}})
        api.put_configmap(NS, "egress-allowlist", yaml.safe_load(EXAMPLE.read_text())["data"])
        api.put_object("deployments", deployment("web", {"egress-sidecar.io/inject": "true"}))
        yield kubeconfig
    finally:
        api.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    # No host names: the page's examples are decided before any lookup.
    running = start_sidecar(
        tmp_path_factory.mktemp("troubleshooting-sidecar"), allowlist=EXAMPLE.read_text()
    )
    yield running
    running.stop()


def test_every_command_on_the_page_runs(cluster: Path, sidecar: Sidecar) -> None:
    ran = run_examples(PAGE, proxy=f"127.0.0.1:{sidecar.explicit_port}", kubeconfig=cluster)
    assert len(ran) == len(examples(PAGE)) >= 10
    for r in ran:
        command = r.example.command
        if " check " in command:
            # check's exit code is the decision: these examples are all denials.
            assert r.returncode == 1, (command, r.stderr)
        elif command.startswith("curl -sS") and "https://" in command:
            assert r.returncode == 56, (command, r.stderr)  # the CONNECT was refused
        else:
            assert r.returncode == 0, (command, r.stderr)
    # The decisions the curl examples caused are the sidecar's, with the page's reasons.
    reasons = {d["reason"] for d in sidecar.wait_decisions(count=5)}
    assert {"no allow rule matches", "private address", "invalid destination"} <= reasons
