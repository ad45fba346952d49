"""docs/kubectl-egress.md: every command in it runs (through the real kubectl, which finds the
plugin on PATH) against the API stand-in and real sidecars, exits as the page says, and prints
what the page shows first; its manifests and JSON are what the code accepts."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sidecar.destinations import SeenDestination
from sidecar.policy.parse import parse_allowlist
from tests.injector.support import validate
from tests.kubectl.golden import normalize
from tests.kubectl.world import NS, PORTS, World, build_world
from tests.support.sidecar import BIN, sidecar_env

DOC = Path(__file__).parents[2] / "docs" / "kubectl-egress.md"
POD = "web-7d9f-11111"


@dataclass(frozen=True)
class Example:
    command: str
    output: list[str]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def examples() -> list[Example]:
    found: list[Example] = []
    for block in _blocks("console"):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            found.append(Example(command, output))
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("docs"))
    try:
        w.add_injected_pod(POD)
        api, cdn, db = PORTS["api"], PORTS["cdn"], PORTS["db"]
        assert w.connect(POD, f"api.github.com:{api}").startswith(b"HTTP/1.1 200")
        for host in ("img", "js", "css"):
            assert w.get(POD, f"http://{host}.shopcdn.net:{cdn}/") == 200
        assert w.get(POD, f"http://db.shop.internal:{db}/") == 200
        w.sidecars[POD].wait_decisions(count=5)
        yield w
    finally:
        w.stop()


def _collapse(line: str) -> str:
    return " ".join(normalize(line).split())


def test_the_page_has_every_command() -> None:
    commands = " ".join(e.command for e in examples())
    for command in ("status", "check", "suggest", "diff", "--help", "plugin list"):
        assert command in commands


def test_every_command_on_the_page_runs(world: World, tmp_path: Path) -> None:
    env = sidecar_env({"KUBECONFIG": str(world.kubeconfig), "PATH": f"{BIN}:/usr/bin:/bin"})
    for example in examples():
        apply = re.fullmatch(r"kubectl apply -f (\S+)", example.command)
        if apply:
            # The stand-in serves no server-side apply: put what `kubectl apply` would.
            manifest = yaml.safe_load((tmp_path / apply.group(1)).read_text())
            meta = manifest["metadata"]
            world.api.put_configmap(meta["namespace"], meta["name"], manifest["data"])
            continue
        out = subprocess.run(
            ["bash", "-c", example.command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        allowed = (
            {0, 1} if " check " in example.command or "--exit-code" in example.command else {0}
        )
        assert out.returncode in allowed, (example.command, out.stderr)
        assert "error" not in out.stderr, (example.command, out.stderr)
        if example.output:
            first = out.stdout.splitlines()[0] if out.stdout else ""
            assert _collapse(first) == _collapse(example.output[0]), example.command
    listed = subprocess.run(
        ["kubectl", "plugin", "list"], env=env, capture_output=True, text=True, check=False
    )
    assert str(BIN / "kubectl-egress") in listed.stdout


def test_the_suggest_example_is_a_valid_allowlist_and_the_role_is_valid() -> None:
    manifests = [yaml.safe_load(block) for block in _blocks("yaml")]
    role = next(m for m in manifests if m["kind"] == "Role")
    validate(role)
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])) for r in role["rules"]}
    assert (("",), ("pods/proxy",)) in rules
    configmap = next(m for m in manifests if m["kind"] == "ConfigMap")
    validate(configmap)
    parse_allowlist(configmap["data"]["allowlist.yaml"], source="doc")


def test_the_json_example_is_what_the_sidecar_serves(world: World) -> None:
    [block] = _blocks("json")
    doc = json.loads(block)
    served = json.loads(world.sidecars[POD].health("/debug/destinations")[1])
    assert doc.keys() == served.keys()
    for item in doc["destinations"]:
        assert item.keys() == served["destinations"][0].keys()
        SeenDestination.from_json(item)
    assert NS == "shop"  # the page's namespace is the world's (`-n shop` in its commands)
