"""The HTTPS inspection sections of docs/injector.md and docs/install.md: every command in them
runs as far as this machine allows (no cluster: the `egress-injector` side for real and its
manifest schema-checked, `kubectl apply -k` as `kubectl kustomize`, `kubectl annotate` for real
with --local on a Deployment then injected), and the paths, variables and names they state are
the code's."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.mutate import (
    BUNDLE_VOLUME,
    CA_BUNDLE_CONTAINER,
    CA_CERT_VOLUME,
    CA_VOLUME,
    TRUST_ENV,
    ca_bundle_container,
    inject_workload,
)
from sidecar import contract as c
from tests.injector.support import REPO, ca_key_exposures, config, validate

INJECTOR_MD = REPO / "docs" / "injector.md"
INSTALL_MD = REPO / "docs" / "install.md"


def section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def commands(text: str) -> list[str]:
    """The command lines of the ```sh blocks, trailing comments dropped."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


INJECTOR_SECTION = section(INJECTOR_MD, "## HTTPS inspection")
INSTALL_SECTION = section(INSTALL_MD, "### Optional: inspect HTTPS")
COMMANDS = commands(INJECTOR_SECTION)

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "annotations": {c.ANNOTATION_INJECT: "true"},
    },
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "python:3.13-slim"}]},
        },
    },
}


def test_both_pages_give_the_same_commands() -> None:
    assert len(COMMANDS) == 3
    assert commands(INSTALL_SECTION) == COMMANDS


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs(command: str, tmp_path: Path) -> None:
    if command.startswith("egress-injector "):
        left, _, right = command.partition("|")
        assert right.split() == ["kubectl", "create", "-f", "-"]
        argv = shlex.split(left)
        proc = _run([sys.executable, "-m", "injector.cli", *argv[1:]])
        assert proc.returncode == 0, proc.stderr
        (secret,) = yaml.safe_load_all(proc.stdout)
        validate(secret)  # what kubectl create receives: a valid kubernetes.io/tls Secret
        assert secret["metadata"] == {
            "name": c.INSPECT_CA_SECRET,
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "egress-sidecar"},
        }
        assert secret["type"] == "kubernetes.io/tls"
        return
    argv = shlex.split(command)
    if argv[:2] == ["kubectl", "apply"]:
        assert argv[2:4] == ["-n", "shop"] and argv[4] == "-k"
        proc = _run(["kubectl", "kustomize", str(REPO / argv[5])])
        assert proc.returncode == 0, proc.stderr
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        cert = next(d for d in docs if d["kind"] == "Certificate")
        assert cert["spec"]["secretName"] == c.INSPECT_CA_SECRET
        return
    # kubectl -n shop annotate deploy web KEY=VALUE: the same arguments, applied by the real
    # kubectl to a local Deployment, then what the webhook makes of it
    assert argv[:5] == ["kubectl", "-n", "shop", "annotate", "deploy"] and argv[5] == "web"
    manifest = tmp_path / "web.json"
    manifest.write_text(json.dumps(DEPLOYMENT))
    proc = _run(["kubectl", "annotate", "--local", "-f", str(manifest), *argv[6:], "-o", "json"])
    assert proc.returncode == 0, proc.stderr
    annotated = json.loads(proc.stdout)
    result = inject_workload(annotated, config())
    assert result.injected
    spec = result.pod["spec"]["template"]["spec"]
    names = [x["name"] for x in spec["initContainers"]]
    assert CA_BUNDLE_CONTAINER in names
    assert ca_key_exposures(spec) == []
    validate(result.pod)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_section_states_the_code_s_names_and_paths() -> None:
    text = _flat(INJECTOR_SECTION)
    for name in (
        c.ANNOTATION_INSPECT_CA,
        c.INSPECT_CA_SECRET,
        c.INSPECT_CA_DIR,
        c.ENV_INSPECT_CA_DIR,
        CA_VOLUME,
        CA_CERT_VOLUME,
        BUNDLE_VOLUME,
        CA_BUNDLE_CONTAINER,
        "config/inspect-ca-cert-manager",
    ):
        assert f"`{name}`" in text or f"{name}" in text, name
    # the variables table: each variable with the path it is given
    for var, value in TRUST_ENV:
        row = re.search(rf"\| `{var}` \| ([^|]+) \|", INJECTOR_SECTION)
        assert row, var
        assert value in row.group(1) or "the same bundle" in row.group(1), var
    # the init container's command line, as injected
    container = ca_bundle_container(config())
    assert _flat(" ".join(container["command"] + container["args"])) in text
