"""docs/security.md: its commands run and print what the page shows, and every test it cites as
the proof of a claim exists (a renamed or deleted test would leave a claim unproven)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.docs.doc_commands import ROOT, examples, run_examples

PAGE = ROOT / "docs" / "security.md"


def cited_tests() -> list[tuple[Path, str | None]]:
    """(file, test) for each `tests/...py::test` on the page; `::test` alone continues the file
    named last, and a bare `tests/...py` cites the file."""
    found: list[tuple[Path, str | None]] = []
    current: Path | None = None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", PAGE.read_text("utf-8")):
        path, test = match.groups()
        if path is None and test is None:
            continue
        if path is not None:
            current = ROOT / path
        assert current is not None, f"`::{test}` before any file"
        found.append((current, test))
    return found


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_cited_test_exists() -> None:
    cited = cited_tests()
    assert len(cited) >= 40
    for path, test in cited:
        assert path.is_file(), f"docs/security.md cites {path.relative_to(ROOT)}, which is gone"
        if test is not None:
            assert test in _functions(path), (
                f"docs/security.md cites {path.relative_to(ROOT)}::{test}, which is gone"
            )


def test_every_command_on_the_page_runs() -> None:
    ran = run_examples(PAGE, proxy=None, kubeconfig=None)
    assert len(ran) == len(examples(PAGE)) == 2
    for r in ran:
        assert r.returncode == 0, (r.example.command, r.stderr)
    assert "egress-init" not in ran[1].stdout  # -o /dev/null: only the report was printed
