"""yamltree.compose_all against PyYAML's own composer: the same graph, the same errors, and
shape bounds that agree with a walk of the expanded graph."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yaml import nodes as yn
from yaml.composer import ComposerError

from sidecar.policy.yamltree import (
    MappingNode,
    Node,
    ScalarNode,
    SequenceNode,
    Shape,
    ShapeError,
    compose_all,
)

# The pure-Python parser and libyaml's (typed as SafeLoader: both are, at run time).
LOADERS: list[type[yaml.SafeLoader]] = [yaml.SafeLoader] + (
    [getattr(yaml, "CSafeLoader")] if hasattr(yaml, "CSafeLoader") else []  # noqa: B009
)
WIDE = Shape(max_depth=10_000, alias_visits=10**9)


def same_graph(ours: Node, theirs: yn.Node, pairs: dict[int, int]) -> None:
    """Same kinds, tags, values, styles and start positions; shared nodes shared alike."""
    if id(ours) in pairs:
        assert pairs[id(ours)] == id(theirs)  # an alias resolves to the same anchor
        return
    pairs[id(ours)] = id(theirs)
    assert (ours.tag, ours.line, ours.column) == (
        theirs.tag,
        theirs.start_mark.line,
        theirs.start_mark.column,
    )
    if isinstance(ours, ScalarNode):
        assert isinstance(theirs, yn.ScalarNode)
        assert (ours.value, ours.style) == (theirs.value, theirs.style)
    elif isinstance(ours, SequenceNode):
        assert isinstance(theirs, yn.SequenceNode)
        assert len(ours.value) == len(theirs.value)
        for a, b in zip(ours.value, theirs.value, strict=True):
            same_graph(a, b, pairs)
    else:
        assert isinstance(ours, MappingNode) and isinstance(theirs, yn.MappingNode)
        assert len(ours.value) == len(theirs.value)
        for (ak, av), (bk, bv) in zip(ours.value, theirs.value, strict=True):
            same_graph(ak, bk, pairs)
            same_graph(av, bv, pairs)


def assert_same(text: str, loader: type[yaml.SafeLoader]) -> None:
    ours = compose_all(text, loader, WIDE)
    theirs = list(yaml.compose_all(text, Loader=loader))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        same_graph(a, b, {})


HANDWRITTEN = [
    "",
    "# only a comment\n",
    "---\n",
    "allow:\n  - a.test\n  - {host: b.test, ports: [80, 443]}\ndeny: []\n",
    "a: &x [1, 2]\nb: *x\nc: &y {k: *x}\nd: [*y, *y]\n",
    "? [complex, key]\n: value\n",
    "s: !!str 42\ni: !!int '7'\nt: !custom thing\nn: ~\nb: yes\nf: 1.5\n",
    "lit: |\n  one\n  two\nfold: >\n  a\n  b\nq: 'single'\nd: \"double\"\n",
    "- one\n---\n- two\n...\n---\nthree\n",
    "anchored_scalar: &s text\nagain: *s\n",
    "flow: {a: [b, {c: d}], e: f}\n",
]


@pytest.mark.parametrize("loader", LOADERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("text", HANDWRITTEN)
def test_the_graph_is_pyyamls(text: str, loader: type[yaml.SafeLoader]) -> None:
    assert_same(text, loader)


# Values that safe_dump writes with anchors when an object is shared.
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.text(max_size=12),
    st.floats(allow_nan=False),
)
TREES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def shared(tree: Any) -> Any:
    """The tree with its first collection referenced twice more (anchors and aliases)."""
    return {"first": tree, "again": tree, "list": [tree, tree]}


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(TREES, st.booleans(), st.sampled_from(LOADERS))
def test_any_dumped_document_composes_as_pyyaml_does(
    tree: Any, flow: bool, loader: type[yaml.SafeLoader]
) -> None:
    text = yaml.safe_dump(shared(tree), default_flow_style=flow, allow_unicode=True)
    assert_same(text, loader)


def described(exc: BaseException) -> tuple[object, ...]:
    """What the allowlist parser reads of an error (libyaml's marks carry no snippet)."""
    assert isinstance(exc, yaml.MarkedYAMLError)
    marks = [(m.line, m.column) if m else None for m in (exc.context_mark, exc.problem_mark)]
    return type(exc), exc.context, exc.problem, *marks


@pytest.mark.parametrize("loader", LOADERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "text",
    [
        "a: *nowhere\n",
        "a: &x 1\nb: &x 2\n",
        "a: [1, 2\n",
        "a: b: c\n",
        "\t- tab\n",
    ],
)
def test_errors_are_pyyamls(text: str, loader: type[yaml.SafeLoader]) -> None:
    """The parser's and scanner's errors are the loader's own; the composer's are the
    pure-Python composer's (libyaml's leaves the alias's name out)."""
    with pytest.raises(yaml.YAMLError) as ours:
        compose_all(text, loader, WIDE)
    reference = yaml.SafeLoader if isinstance(ours.value, ComposerError) else loader
    with pytest.raises(yaml.YAMLError) as theirs:
        list(yaml.compose_all(text, Loader=reference))
    assert described(ours.value) == described(theirs.value)


def expanded(node: yn.Node) -> tuple[int, int, int]:
    """(visits, distinct nodes, depth) of a walk of the graph with aliases expanded."""
    visits, seen, deepest = 0, set(), 0
    stack = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        visits += 1
        seen.add(id(current))
        deepest = max(deepest, depth)
        if isinstance(current, yn.SequenceNode):
            stack += [(child, depth + 1) for child in current.value]
        elif isinstance(current, yn.MappingNode):
            for key, value in current.value:
                stack += [(key, depth + 1), (value, depth + 1)]
    return visits, len(seen), deepest


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(TREES, st.sampled_from(LOADERS))
def test_the_bounds_are_exactly_the_expanded_walks(
    tree: Any, loader: type[yaml.SafeLoader]
) -> None:
    text = yaml.safe_dump(shared(tree))
    (root,) = yaml.compose_all(text, Loader=loader)
    visits, distinct, depth = expanded(root)
    extra = visits - distinct
    compose_all(text, loader, Shape(max_depth=depth, alias_visits=extra))  # exactly at both
    assert extra > 0 or not isinstance(tree, list | dict)  # a shared collection is aliased
    if extra:
        with pytest.raises(ShapeError, match="extra nodes"):
            compose_all(text, loader, Shape(max_depth=depth, alias_visits=extra - 1))
    with pytest.raises(ShapeError, match=f"deeper than {depth - 1} levels"):
        compose_all(text, loader, Shape(max_depth=depth - 1, alias_visits=extra))


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a: &r [1, *r]\n", 0, "through aliases (a recursive anchor?)"),
        ("x: &deep [[1]]\ny: [*deep]\n", 0, "deeper than 4 levels through aliases"),
        ("a:\n  b:\n    c:\n      d:\n        e: 1\n", 3, "deeper than 4 levels"),  # key d
        ("a: &l [1, 2, 3]\nb: [*l, *l, *l]\n", 0, "past 10 extra nodes"),
    ],
)
def test_a_shape_error_names_the_node_at_fault(text: str, line: int, message: str) -> None:
    with pytest.raises(ShapeError) as caught:
        compose_all(text, LOADERS[-1], Shape(max_depth=4, alias_visits=10))
    assert caught.value.line == line
    assert message in caught.value.message


def test_items_of_top_level_lists_are_offered_as_composed_and_kept_only_if_refused() -> None:
    text = "allow:\n  - a\n  - {b: [c]}\n  - d\nother: [x, [y]]\nnested: {deny: [z]}\n"
    offered: list[tuple[str, int, str]] = []

    def take(root: MappingNode, key: Node, sequence: SequenceNode, index: int, item: Node) -> bool:
        assert isinstance(key, ScalarNode)
        assert all(value is not sequence for _, value in root.value)  # still being composed
        kind = item.value if isinstance(item, ScalarNode) else type(item).__name__
        offered.append((key.value, index, str(kind)))
        return key.value == "allow" and index != 2  # keep the third

    (root,) = compose_all(text, LOADERS[-1], WIDE, take)
    assert offered == [
        ("allow", 0, "a"),
        ("allow", 1, "MappingNode"),
        ("allow", 2, "d"),
        ("other", 0, "x"),
        ("other", 1, "SequenceNode"),
    ]
    assert isinstance(root, MappingNode)
    values = {k.value: v for k, v in root.value if isinstance(k, ScalarNode)}
    allow, other = values["allow"], values["other"]
    assert isinstance(allow, SequenceNode) and isinstance(other, SequenceNode)
    assert [n.value for n in allow.value if isinstance(n, ScalarNode)] == ["d"]
    assert len(other.value) == 2
