"""Review of issue 8 item 2: a deeply nested allowlist is refused, never crashes the process.

libyaml's composer (PyYAML's CSafeLoader, which the parser uses) recurses in C once per level:
with libyaml 0.2.5 (Debian's python3-yaml) some 100,000 levels — 200 KB of ``[`` or ``- ``, far
under the 1 MiB size limit — overflow the stack and the process dies of SIGSEGV. The pinned
PyYAML wheel bundles libyaml 0.2.6, which refuses past 1,000 levels: this guards that pin.
Run as real processes (a crash must not take pytest with it): ``validate``, and ``run`` with a
file source being edited.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support.sidecar import BIN, start_sidecar

LEVELS = 120_000  # past what an 8 MiB stack survives in libyaml's composer
DEEP = {
    "flow-sequences": "allow: " + "[" * LEVELS + "]" * LEVELS + "\n",
    "flow-mappings": "allow: " + "{a: " * LEVELS + "b" + "}" * LEVELS + "\n",
    "block-sequences-on-one-line": "allow:\n  " + "- " * LEVELS + "x\n",
    "in-a-configmap": (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: egress}\ndata:\n"
        "  allowlist.yaml: |\n    allow: " + "[" * LEVELS + "]" * LEVELS + "\n"
    ),
}
GOOD_1 = "allow:\n  - one.test\n"
GOOD_2 = "allow:\n  - two.test\n"


@pytest.mark.parametrize("name", sorted(DEEP))
def test_validate_refuses_a_deep_document_without_crashing(name: str, tmp_path: Path) -> None:
    path = tmp_path / "allowlist.yaml"
    path.write_text(DEEP[name])
    assert path.stat().st_size < 1024 * 1024  # inside the size limit: depth must stop it
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "egress-sidecar"), "validate", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-500:])  # invalid, not a signal
    assert "nest" in proc.stdout, proc.stdout  # ours (32 levels) or libyaml's (1,000)
    assert elapsed < 10, elapsed


def test_run_keeps_serving_after_a_deep_edit_and_applies_the_next_good_one(
    tmp_path: Path,
) -> None:
    sidecar = start_sidecar(tmp_path, allowlist=GOOD_1)  # the file is polled every 0.2 s
    path = tmp_path / "allowlist.yaml"
    try:
        path.write_text(DEEP["flow-sequences"])
        deadline = time.monotonic() + 20
        while not any("allowlist rejected" in line for line in sidecar.stderr):
            assert sidecar.proc.poll() is None, (sidecar.proc.returncode, sidecar.stderr[-5:])
            assert time.monotonic() < deadline, sidecar.stderr[-5:]
            time.sleep(0.05)
        assert sidecar.health("/healthz/ready")[0] == 200
        path.write_text(GOOD_2)
        while not any("two.test" in line or "allowlist applied" in line
                      for line in sidecar.stderr[-3:]):  # fmt: skip
            assert sidecar.proc.poll() is None, (sidecar.proc.returncode, sidecar.stderr[-5:])
            assert time.monotonic() < deadline, sidecar.stderr[-5:]
            time.sleep(0.05)
    finally:
        assert sidecar.stop() == 0
