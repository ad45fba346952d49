"""Runs a page's ```console examples (`$ command` then the output it shows) as a user would:
bash, the venv's commands and kubectl on PATH, kubectl pointed at the API stand-in, the proxy
address of the page (127.0.0.1:15001) replaced by a real sidecar's."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.sidecar import BIN, sidecar_env

ROOT = Path(__file__).resolve().parents[2]
PAGE_PROXY = "127.0.0.1:15001"


@dataclass(frozen=True)
class Example:
    command: str
    output: list[str]


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def examples(page: Path) -> list[Example]:
    found: list[Example] = []
    for block in blocks(page, "console"):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            found.append(Example(command, output))
    return found


def normalize(line: str) -> str:
    """What differs between runs: file digests, resourceVersions, where the allowlist file is."""
    line = re.sub(r"sha256:[0-9a-f]{12}", "sha256:…", line)
    line = re.sub(r"file:\S*allowlist\.yaml", "file:allowlist.yaml", line)
    line = re.sub(r"version \d+", "version N", line)
    return " ".join(line.split())


@dataclass(frozen=True)
class Ran:
    example: Example
    returncode: int
    stdout: str
    stderr: str


def run_examples(
    page: Path, *, proxy: str | None, kubeconfig: Path | None, cwd: Path = ROOT
) -> list[Ran]:
    """Every example of ``page`` run; its shown output must be the first lines printed (stdout
    then stderr, as a terminal shows them)."""
    env = sidecar_env({"PATH": f"{BIN}:/usr/bin:/bin"})
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    ran = []
    for example in examples(page):
        command = example.command
        if proxy is not None:
            command = command.replace(PAGE_PROXY, proxy)
        out = subprocess.run(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        printed = (out.stdout + out.stderr).splitlines()
        shown = [normalize(x) for x in example.output]
        assert [normalize(x) for x in printed[: len(shown)]] == shown, (
            f"{page.name}: `{example.command}` printed:\n{out.stdout}{out.stderr}"
        )
        ran.append(Ran(example, out.returncode, out.stdout, out.stderr))
    return ran
