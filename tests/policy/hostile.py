"""Hostile allowlist documents shared by the parser, source and command tests."""

from __future__ import annotations


def laughs(field: str, fanout: int = 100, levels: int = 4, rules: int = 1200) -> str:
    """A "billion laughs" allowlist: anchors nesting aliases ``fanout`` wide, used by rules."""
    leaf = {"host": "a.test", "ports": "80", "paths": "/x", "methods": "GET", "cidr": "1.2.3.4"}
    lines = ["deny:", f"  - &l0 [{', '.join([leaf[field]] * fanout)}]"]
    for level in range(1, levels):
        lines.append(f"  - &l{level} [{', '.join([f'*l{level - 1}'] * fanout)}]")
    top = f"*l{levels - 1}"
    lines.append("allow:")
    for index in range(rules):
        if field in ("host", "cidr"):
            lines.append(f"  - {{{field}: {top}}}")
        else:
            lines.append(f"  - {{host: r{index}.test, {field}: {top}}}")
    return "\n".join(lines) + "\n"
