"""A compact YAML node graph, composed from the parser's events.

The allowlist parser needs nodes, not values (every problem names its line), but PyYAML's
nodes are heavy: each carries two ``Mark`` objects with their own integers, about 330 bytes a
node. A 10,000-rule allowlist composed to 24 MB of nodes that lived only for the parse, and
because pymalloc returns an arena only when all of it is free, the sidecar's RSS kept that
peak after every reload (50 → 75 MiB over a dozen edits). These nodes keep what the parser
reads (tag, value, style, line, column), in slots, and share repeated values and line
numbers: under half the memory, composed no slower than libyaml's own composer.

The graph is PyYAML's: the same events (libyaml's when installed), the same tag resolution,
anchors and aliases, and the same ComposerError messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.error import Mark
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode as _YamlMapping
from yaml.nodes import ScalarNode as _YamlScalar
from yaml.nodes import SequenceNode as _YamlSequence

__all__ = [
    "ItemSink",
    "MappingNode",
    "Node",
    "ScalarNode",
    "SequenceNode",
    "Shape",
    "ShapeError",
    "compose_all",
]


class Node:
    """Where a node starts: 0-based ``line`` and ``column``, as PyYAML's ``start_mark``."""

    __slots__ = ("column", "line", "tag")

    def __init__(self, tag: str, line: int, column: int) -> None:
        self.tag = tag
        self.line = line
        self.column = column


class ScalarNode(Node):
    __slots__ = ("style", "value")

    def __init__(self, tag: str, value: str, style: str | None, line: int, column: int) -> None:
        super().__init__(tag, line, column)
        self.value = value
        self.style = style


class SequenceNode(Node):
    __slots__ = ("value",)

    def __init__(self, tag: str, line: int, column: int) -> None:
        super().__init__(tag, line, column)
        self.value: list[Node] = []


class MappingNode(Node):
    __slots__ = ("value",)

    def __init__(self, tag: str, line: int, column: int) -> None:
        super().__init__(tag, line, column)
        self.value: list[tuple[Node, Node]] = []


class ShapeError(Exception):
    """The document passes a bound on its shape (nesting depth, alias expansion)."""

    def __init__(self, node_or_mark: Node | Mark, message: str) -> None:
        super().__init__(message)
        self.line = node_or_mark.line
        self.column = node_or_mark.column
        self.message = message


@dataclass(frozen=True, slots=True)
class Shape:
    """The bounds ``compose_all`` enforces while it composes.

    Aliases make the node graph a DAG: a walk of it visits a shared node once per path to it,
    so a few KiB of nested aliases ("billion laughs") would cost billions of visits.
    ``alias_visits`` bounds the visits aliases add beyond the document's own nodes, counted
    as each alias is composed (the expanded size of its anchor), never by walking.
    """

    max_depth: int
    alias_visits: int


# Calls with each item of a list that is a value of the root mapping, as soon as the item is
# composed: (the root mapping so far, the list's key, the list, the item's index from 0, the
# item). True: the item was taken (checked on the spot), and the list does not keep it.
type ItemSink = Callable[[MappingNode, Node, SequenceNode, int, Node], bool]


# Scalars up to this long have their implicit tag remembered (not every host name: the cache
# would cost more memory than the resolver's regular expressions cost time).
_RESOLVED_MAX = 16


def _mark(node: Node) -> Mark:
    return Mark("<unicode string>", 0, node.line, node.column, None, 0)


def compose_all(
    text: str,
    loader: type[yaml.SafeLoader],
    shape: Shape,
    on_item: ItemSink | None = None,
) -> list[Node]:
    """The root node of each document in ``text``, as ``yaml.compose_all`` with ``loader``.

    Raises what PyYAML raises (a ScannerError, ParserError or ComposerError with its marks),
    and ShapeError at the first node past ``shape``. ``on_item`` lets a caller consume the
    items of a top-level list as they come, so a large allowlist never exists as one tree.
    """
    parser: Any = loader(text)  # the event API is untyped in PyYAML's stubs
    resolve = parser.resolve
    max_depth, alias_budget = shape.max_depth, shape.alias_visits
    # One object per distinct scalar and line number: keys ("host", "ports") and values
    # ("443") repeat on every rule, and several nodes share each line (past 256, each line
    # number is an object of its own).
    shared_values: dict[str, str] = {}
    shared_ints: dict[int, int] = {}
    resolved: dict[tuple[str, tuple[bool, bool]], str] = {}
    documents: list[Node] = []
    anchors: dict[str, Node] = {}
    # An anchored node's expanded size (nodes, aliases counted in full) and height (levels).
    expanded: dict[int, tuple[int, int]] = {}
    extra = 0  # visits that aliases add
    # Open collections, innermost last, each with its pending mapping key, the expanded size
    # so far, the tallest child, and (for a list in the root mapping) the items taken.
    open_nodes: list[SequenceNode | MappingNode] = []
    open_anchors: list[str | None] = []
    pending_key: list[Node | None] = []
    sizes: list[int] = []
    tallest: list[int] = []
    taken = 0
    root: Node | None = None
    try:
        while True:
            event = parser.get_event()
            kind = type(event)
            node: Node
            size, height = 1, 1
            if kind is ScalarEvent or kind is SequenceStartEvent or kind is MappingStartEvent:
                mark = event.start_mark
                if len(open_nodes) >= max_depth:
                    raise ShapeError(mark, f"the document nests deeper than {max_depth} levels")
                anchor = event.anchor
                if anchor is not None and anchor in anchors:
                    raise ComposerError(
                        f"found duplicate anchor {anchor!r}; first occurrence",
                        _mark(anchors[anchor]),
                        "second occurrence",
                        mark,
                    )
                line = shared_ints.setdefault(mark.line, mark.line)
                column = mark.column  # mostly under 256: one of CPython's cached ints
                tag = event.tag
                if kind is ScalarEvent:
                    value = shared_values.setdefault(event.value, event.value)
                    if tag is None or tag == "!":
                        implicit = event.implicit
                        if len(value) > _RESOLVED_MAX:
                            tag = resolve(_YamlScalar, value, implicit)
                        else:  # keys and ports, on every rule: resolved once each
                            tag = resolved.get((value, implicit))
                            if tag is None:
                                tag = resolve(_YamlScalar, value, implicit)
                                resolved[value, implicit] = tag
                    node = ScalarNode(tag, value, event.style, line, column)
                    if anchor is not None:
                        anchors[anchor] = node
                        expanded[id(node)] = (1, 1)
                else:
                    is_sequence = kind is SequenceStartEvent
                    if tag is None or tag == "!":
                        tag = resolve(
                            _YamlSequence if is_sequence else _YamlMapping, None, event.implicit
                        )
                    collection = (SequenceNode if is_sequence else MappingNode)(tag, line, column)
                    if anchor is not None:
                        anchors[anchor] = collection
                    if len(open_nodes) == 1:
                        taken = 0
                    open_nodes.append(collection)
                    open_anchors.append(anchor)
                    pending_key.append(None)
                    sizes.append(1)
                    tallest.append(0)
                    continue
            elif kind is AliasEvent:
                found = anchors.get(event.anchor)
                if found is None:
                    raise ComposerError(
                        None, None, f"found undefined alias {event.anchor!r}", event.start_mark
                    )
                # Unknown: the anchor's own node is still open, so it contains itself.
                size, height = expanded.get(id(found), (0, max_depth + 1))
                if len(open_nodes) + height > max_depth:
                    raise ShapeError(
                        found,
                        f"the document nests deeper than {max_depth} levels through aliases "
                        "(a recursive anchor?)",
                    )
                extra += size
                if extra > alias_budget:
                    raise ShapeError(
                        found,
                        "aliases (*name) of the anchor on this line expand the document past "
                        f"{alias_budget} extra nodes: write the rules out",
                    )
                node = found
            elif kind is SequenceEndEvent or kind is MappingEndEvent:
                node = open_nodes.pop()
                pending_key.pop()
                size = sizes.pop()
                height = tallest.pop() + 1
                if open_anchors.pop() is not None:
                    expanded[id(node)] = (size, height)
            elif kind is DocumentEndEvent:
                if root is not None:
                    documents.append(root)
                root = None
                anchors = {}
                expanded = {}
                continue
            elif kind is StreamEndEvent:
                break
            else:  # stream and document starts
                continue
            # Attach the finished node to its parent, or make it the document's root.
            if not open_nodes:
                root = node
                continue
            sizes[-1] += size
            if height > tallest[-1]:  # noqa: PLR1730 (no call: this runs for every node)
                tallest[-1] = height
            parent = open_nodes[-1]
            if isinstance(parent, SequenceNode):
                if (
                    on_item is not None
                    and len(open_nodes) == 2
                    and isinstance(top := open_nodes[0], MappingNode)
                    and (key := pending_key[0]) is not None
                    and on_item(top, key, parent, len(parent.value) + taken, node)
                ):
                    taken += 1
                else:
                    parent.value.append(node)
            else:
                key = pending_key[-1]
                if key is None:
                    pending_key[-1] = node
                else:
                    parent.value.append((key, node))
                    pending_key[-1] = None
    finally:
        parser.dispose()
    return documents
