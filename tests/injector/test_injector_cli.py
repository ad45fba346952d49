"""`egress-injector` command line: help texts, inject from files and stdin, errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.cli import main
from injector.offline import inject_text
from sidecar import contract as c
from tests.injector.support import GOLDEN, config, validate


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        ([], ["serve", "inject", "certs"]),
        (
            ["serve"],
            [
                "/mutate/pods",
                "/mutate/workloads",
                "--tls-cert",
                "sidecarStyle",
                "clusterCIDRs",
                "otelEnv",
                "--max-request-bytes",
            ],
        ),
        (["inject"], ["kube-inject", "--require-opt-in", "exit status", "-f"]),
        (["certs"], ["caBundle", "--output-dir", "kubectl apply -k", "cert-manager"]),
    ],
)
def test_help_explains(
    capsys: pytest.CaptureFixture[str], command: list[str], phrases: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for phrase in phrases:
        assert phrase in out, phrase


def test_inject_file_to_output(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    source = GOLDEN / "input" / "deployment-transparent.yaml"
    proc = run("inject", "-f", str(source), "-o", str(out), "--sidecar-style", "container")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "injected: document 1 (Deployment web)" in proc.stderr
    (doc,) = yaml.safe_load_all(out.read_text())
    assert doc["spec"]["template"]["spec"]["containers"][0]["name"] == c.SIDECAR_CONTAINER
    validate(doc)


def test_require_opt_in_and_passthrough() -> None:
    text = (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n"
        "spec:\n  containers: [{name: a, image: x}]\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {k: v}\n"
    )
    proc = run("inject", "--require-opt-in", "-f", "-", stdin=text)
    assert proc.returncode == 0
    pod, cm = yaml.safe_load_all(proc.stdout)
    assert "initContainers" not in pod["spec"]
    assert "not injected: document 1 (Pod a): not opted in" in proc.stderr
    assert cm == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cm"},
        "data": {"k": "v"},
    }
    proc = run("inject", "-q", "-f", "-", stdin=text)
    pod, _ = yaml.safe_load_all(proc.stdout)
    assert pod["spec"]["initContainers"][1]["name"] == c.SIDECAR_CONTAINER
    # -q keeps the warnings (here: the runtime's defaults let container a bypass capture)
    assert proc.stderr.splitlines() == [
        "warning: document 1 (Pod a): container a: capability NET_RAW (a runtime default): raw "
        "sockets can send packets the capture rules do not cover; add NET_RAW (or ALL) to "
        "capabilities.drop",
        "warning: document 1 (Pod a): container a: may run as root (no runAsUser/runAsNonRoot) "
        "with CAP_SETUID: it can switch to UID 1337, whose traffic is not captured; set "
        "runAsNonRoot: true, or drop SETUID (or ALL)",
    ]


def test_list_items_are_injected() -> None:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "a"},
                "spec": {"containers": [{"name": "a", "image": "x"}]},
            }
        ],
    }
    output, report = inject_text(yaml.safe_dump(doc), config())
    (out,) = yaml.safe_load_all(output)
    assert out["items"][0]["spec"]["initContainers"][0]["name"] == c.INIT_CONTAINER
    assert report.injected == ["document 1 (Pod a)"]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["inject", "-f", "/nonexistent.yaml"], None, "cannot read"),
        (["inject", "-f", "-"], "a: [b", "not valid YAML"),
        (["inject", "-f", "-", "--config", "/nonexistent.yaml"], "", "cannot read"),
    ],
)
def test_inject_errors(args: list[str], stdin: str | None, message: str) -> None:
    proc = run(*args, stdin=stdin)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_workload_is_reported_not_crashed() -> None:
    text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {template: 5}\n"
    proc = run("inject", "-f", "-", stdin=text)
    assert proc.returncode == 0
    assert "not a valid Deployment" in proc.stderr
    assert yaml.safe_load(proc.stdout)["spec"] == {"template": 5}
    assert run("inject", "--strict", "-f", "-", stdin=text).returncode == 3


def test_schema_validation_is_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    output, _ = inject_text((GOLDEN / "input" / "job-transparent.yaml").read_text(), config())
    validate(yaml.safe_load(output))
    with pytest.raises(AssertionError, match="containers"):
        validate(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "x"},
                "spec": {"containers": [{"name": "x", "image": "y", "bogus": 1}]},
            }
        )
