"""Allowlist documents → ``Policy``: every problem found, each with its line.

Works on YAML nodes (``yamltree``: SafeLoader's graph, compact) rather than loaded Python
values, so each problem can name the line it is on, duplicate keys are caught, and the rule can
be shown as written. The rules of the top-level lists are checked as each is composed.
A ConfigMap manifest is accepted too: its ``data["allowlist.yaml"]`` is parsed, and for a
``|`` block scalar the lines of the embedded document are mapped back to lines of the file.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeGuard

import yaml
from publicsuffixlist import PublicSuffixList

from sidecar.contract import ALLOWLIST_KEY
from sidecar.policy.engine import PathPattern, Policy, Rule
from sidecar.policy.errors import AllowlistError, InvalidHost, Problem, Severity, clip, quote
from sidecar.policy.hosts import normalize_host_once, parse_ip, split_host_port
from sidecar.policy.model import IPNetwork, Mode, PolicyMeta
from sidecar.policy.yamltree import (
    MappingNode,
    Node,
    ScalarNode,
    SequenceNode,
    Shape,
    ShapeError,
    compose_all,
)

TOP_KEYS = ("mode", "allow", "deny", "privateRanges")
RULE_KEYS = ("host", "cidr", "ports", "methods", "paths", "broad", "inspect")
MANIFEST_KEYS = ("apiVersion", "kind", "metadata", "data")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_LISTS = ("allow", "deny")  # the top-level keys whose items are rules
_BOOL = "tag:yaml.org,2002:bool"
_TYPE_NAMES = {
    "tag:yaml.org,2002:int": "number",
    "tag:yaml.org,2002:float": "number",
    "tag:yaml.org,2002:bool": "boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "date",
    "tag:yaml.org,2002:binary": "binary",
}
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_DECIMAL_RE = re.compile(r"[1-9][0-9]{0,4}")
_LINE_BREAK_RE = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")
_PATH_BAD_RE = re.compile(r"[\x00-\x20\x7f?#]")
# libyaml's event parser when present (7x faster on large lists).
_FAST_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# The pure-Python loader takes ~3.5 s per MiB here: past this size a bad document keeps
# libyaml's message rather than paying that again.
_RECOMPOSE_MAX = 64 * 1024


_WILDCARD_MESSAGE = 'only a leading "*." wildcard is allowed'


@dataclass(frozen=True, slots=True)
class Limits:
    """What one document may cost to parse; past any of them it is rejected with a problem.

    Aliases (``*name``) make the composed node graph a DAG: walking it visits a shared node
    once per path to it, so a few KiB of nested aliases ("billion laughs") would cost billions
    of visits. ``alias_visits`` bounds the visits aliases add beyond the document's own nodes.
    """

    max_bytes: int = 1024 * 1024  # what the API server accepts in one ConfigMap
    max_depth: int = 32  # an allowlist nests 5 levels deep, a manifest 2 more
    alias_visits: int = 10_000  # sharing a ports list across rules stays far below
    # A backstop only: the bounds above are what keep the cost down (the largest documents
    # take 2-5 s here on a shared core); a hard limit near that would refuse valid ones.
    seconds: float = 30.0


DEFAULT_LIMITS = Limits()

# IPv4 rules shorter than /8 and IPv6 shorter than /32 cover whole registries' worth of
# addresses: allowed, with a warning. /0 (a default route) is refused unless `broad: true`.
_WIDE_PREFIX = {4: 8, 6: 32}


@functools.cache
def _public_suffixes(*, icann_only: bool) -> PublicSuffixList:
    # The package's bundled snapshot, read once (like an import); never fetched at run time.
    # Unknown TLDs (.test, .internal, .local) are not taken as public suffixes.
    return PublicSuffixList(only_icann=icann_only, accept_unknown=False)


class _TooCostlyError(Exception):
    """The document passed a limit; the problem is already recorded."""


def digest(text: str) -> str:
    """``sha256:<12 hex>`` of an allowlist document: the version of a file-based policy."""
    data = text.encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(data).hexdigest()[:12]


# -- positions ---------------------------------------------------------------------------------

# (0-based line, 0-based column) in the text being parsed → (line, column, message prefix)
type Locate = Callable[[int, int], tuple[int | None, int | None, str]]


def _locate_plain(line: int, column: int) -> tuple[int | None, int | None, str]:
    return line + 1, column + 1, ""


def _locate_embedded(file_text: str, node: ScalarNode, embedded: str, key: str) -> Locate:
    """Map lines of a ConfigMap's embedded document to lines of the manifest file.

    Only a literal (``|``) block scalar keeps lines one-to-one; the mapping is verified line by
    line against the file, and anything else reports ``allowlist.yaml line N`` instead.
    """

    def unmapped(line: int, column: int) -> tuple[int | None, int | None, str]:
        return None, None, f"{key} line {line + 1}: "

    if node.style != "|":
        return unmapped
    file_lines = _LINE_BREAK_RE.split(file_text)
    first = node.line + 1  # content starts on the line after the "|" header
    indents: list[int] = []
    for index, content in enumerate(embedded.split("\n")):
        number = first + index
        if number >= len(file_lines):
            if content:
                return unmapped
            indents.append(0)
            continue
        actual = file_lines[number]
        if not content:
            indents.append(len(actual) - len(actual.lstrip(" ")))
            continue
        if not actual.endswith(content) or actual[: len(actual) - len(content)].strip(" "):
            return unmapped
        indents.append(len(actual) - len(content))

    def mapped(line: int, column: int) -> tuple[int | None, int | None, str]:
        if line >= len(indents):
            return unmapped(line, column)
        return first + line + 1, indents[line] + column + 1, ""

    return mapped


# -- the parser --------------------------------------------------------------------------------


@dataclass
class _Document:
    allow: list[Rule] = field(default_factory=list)
    deny: list[Rule] = field(default_factory=list)
    private_ranges: list[IPNetwork] = field(default_factory=list)
    mode: Mode | None = None


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    assert isinstance(node, ScalarNode)  # the graph holds only these three kinds
    if node.tag == _NULL:
        return "nothing (null)"
    kind = _TYPE_NAMES.get(node.tag)
    if kind is None:
        return f"a value tagged {clip(node.tag)}" if node.tag != _STR else quote(node.value)
    return f"{kind} {clip(node.value)}"


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    if len(word) > 64:
        return ""  # no key is that long; difflib's cost grows with the word
    import difflib  # only for a document with a typo: not loaded in every sidecar (~0.2 MiB)

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _is_string(node: Node) -> TypeGuard[ScalarNode]:
    """A string scalar (a key as ``mapping_items`` reads keys, or a string value)."""
    return isinstance(node, ScalarNode) and node.tag == _STR


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _flow(node: Node, depth: int = 0) -> str:
    """A compact one-line rendering of a rule as written."""
    if isinstance(node, ScalarNode):
        return str(node.value)
    if depth > 3:  # aliases can make a node contain itself
        return "..."
    if isinstance(node, SequenceNode):
        return "[" + ", ".join(_flow(item, depth + 1) for item in node.value) + "]"
    if isinstance(node, MappingNode):
        pairs = ", ".join(f"{_flow(k, depth + 1)}: {_flow(v, depth + 1)}" for k, v in node.value)
        return "{" + pairs + "}"
    return "?"


class _RuleList:
    """One allow or deny list, checked a rule at a time in document order."""

    def __init__(self, parser: _Parser, list_name: str) -> None:
        self.parser = parser
        self.list_name = list_name
        self.rules: list[Rule] = []
        self._seen: dict[tuple[object, ...], Rule] = {}

    def add(self, index: int, item: Node) -> None:
        """``index``: the rule's place in its list, from 1."""
        parser, list_name = self.parser, self.list_name
        parser.in_time(item)
        parsed = parser.rule(item, list_name, index)
        if parsed is None:
            return
        rule, broad = parsed
        if list_name == "allow" and not parser.breadth(rule, item, broad=broad):
            return
        first = self._seen.get(rule.key)
        if first is not None:
            also = f" on line {first.line}" if first.line is not None else ""
            parser.problem(
                item,
                f"duplicate {list_name} rule {quote(rule.text)}: same as {quote(first.text)}{also}",
            )
            return
        self._seen[rule.key] = rule
        self.rules.append(rule)


class _Parser:
    def __init__(self, locate: Locate, limits: Limits, deadline: float) -> None:
        self.locate = locate
        self.limits = limits
        self.deadline = deadline
        self._found: list[tuple[tuple[int, int], Problem]] = []
        # One object per distinct port set: a generated allowlist repeats the same few sets
        # over thousands of rules (2 MiB of duplicates for 10,000 rules).
        self._port_sets: dict[frozenset[int], frozenset[int]] = {}
        # The top-level lists whose rules were checked while composed, by id of their node.
        self._lists: dict[int, tuple[SequenceNode, _RuleList]] = {}

    @property
    def problems(self) -> list[Problem]:
        """Errors in document order (a rule's conditions are checked before its target)."""
        return self._sorted(Severity.ERROR)

    @property
    def warnings(self) -> list[Problem]:
        return self._sorted(Severity.WARNING)

    def _sorted(self, severity: Severity) -> list[Problem]:
        found = sorted(self._found, key=lambda item: item[0])
        return [problem for _, problem in found if problem.severity is severity]

    def problem(
        self,
        at: Node | tuple[int, int] | None,
        message: str,
        severity: Severity = Severity.ERROR,
    ) -> None:
        if at is None:
            self._found.append(((-1, -1), Problem(None, None, message, severity)))
            return
        line, column = (at.line, at.column) if isinstance(at, Node) else at
        where_line, where_column, prefix = self.locate(line, column)
        self._found.append(
            ((line, column), Problem(where_line, where_column, prefix + message, severity))
        )

    def warn(self, at: Node, message: str) -> None:
        self.problem(at, message, Severity.WARNING)

    def in_time(self, at: Node) -> None:
        """Stop (_TooCostlyError) once the time is up: a backstop for the other bounds."""
        if time.monotonic() > self.deadline:
            self.problem(
                at,
                f"parsing took longer than {self.limits.seconds:g} s (stopped here): "
                "split the allowlist or simplify it",
            )
            raise _TooCostlyError

    # -- limits --------------------------------------------------------------------------------

    def within_size(self, text: str) -> bool:
        limit = self.limits.max_bytes
        # Characters never outnumber UTF-8 bytes: only a text short enough needs encoding.
        if len(text) <= limit and len(text.encode("utf-8", "surrogatepass")) <= limit:
            return True
        cut = text[:limit]
        line = cut.count("\n")
        self.problem(
            (line, 0),
            f"the document is larger than {limit} bytes (the limit reached on this line): "
            "split it into several ConfigMaps",
        )
        return False

    # -- YAML ----------------------------------------------------------------------------------

    def compose(self, text: str) -> Node | None:
        """The single document's root node, or None (problem recorded, or empty text).

        The rules of a top-level allow or deny list are checked as each is composed (see
        ``take_item``): only a failure of the document as a whole (its YAML, its shape, a
        second document) then discards what they found, as if they were never read.
        """
        if not self.within_size(text):
            return None
        before = len(self._found)
        shape = Shape(self.limits.max_depth, self.limits.alias_visits)
        try:
            try:
                nodes = compose_all(text, _FAST_LOADER, shape, self.take_item)
            except yaml.YAMLError:
                self._discard(before)
                if len(text) > _RECOMPOSE_MAX and _FAST_LOADER is not yaml.SafeLoader:
                    raise
                # Again from the pure-Python parser's events, so messages do not depend on
                # whether libyaml is installed.
                nodes = compose_all(text, yaml.SafeLoader, shape, self.take_item)
        except ShapeError as exc:
            self._discard(before)
            self.problem((exc.line, exc.column), exc.message)
            return None
        except yaml.MarkedYAMLError as exc:
            self._discard(before)
            mark = exc.problem_mark or exc.context_mark
            what = exc.problem or "invalid YAML"
            if exc.context:
                what = f"{what} ({exc.context})"
            self.problem((mark.line, mark.column) if mark else None, f"YAML syntax error: {what}")
            return None
        except yaml.YAMLError as exc:  # e.g. ReaderError: a character YAML does not allow
            self._discard(before)
            position = getattr(exc, "position", None)
            if isinstance(position, int):
                line = len(_LINE_BREAK_RE.findall(text[:position]))
                column = position - max(text.rfind("\n", 0, position) + 1, 0)
                self.problem((line, column), f"YAML error: {_reader_message(exc)}")
            else:
                self.problem(None, f"YAML error: {clip(exc, 200)}")
            return None
        if len(nodes) > 1 or (nodes and _is_manifest(nodes[0])):
            self._discard(before)  # a manifest's own keys are not rules, even if named so
        if len(nodes) > 1:
            self.problem(
                nodes[1],
                f"{len(nodes)} YAML documents in one file: expected a single allowlist "
                "or ConfigMap (remove the extra '---' section)",
            )
            return None
        if not nodes or _is_null(nodes[0]):
            self.problem(
                (0, 0), "the document is empty: expected a mapping with allow: and deny: lists"
            )
            return None
        return nodes[0]

    def _discard(self, before: int) -> None:
        del self._found[before:]
        self._lists.clear()

    def take_item(
        self, root: MappingNode, key: Node, sequence: SequenceNode, index: int, item: Node
    ) -> bool:
        """Check one rule of a top-level allow/deny list as soon as it is composed, so the
        nodes of a large allowlist never exist all at once (10,000 rules: 24 MB of nodes a
        reload left behind in pymalloc's arenas, against ~1 KB now). False: not a rule list,
        or its key came before in ``root`` (the mapping reports that, and reads no rule of
        the repeat): the item stays in the graph."""
        entry = self._lists.get(id(sequence))
        if entry is None:
            if not (_is_string(key) and key.value in _LISTS):
                return False
            if any(_is_string(earlier) and earlier.value == key.value for earlier, _ in root.value):
                return False
            entry = self._lists[id(sequence)] = (sequence, _RuleList(self, key.value))
        entry[1].add(index + 1, item)
        return True

    def mapping_items(self, node: MappingNode, what: str) -> list[tuple[str, Node, Node]]:
        """(key, key node, value node) for string keys; duplicates and non-strings reported."""
        seen: dict[str, Node] = {}
        items: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE:
                self.problem(key_node, "YAML merge keys (<<) are not supported: write it out")
                continue
            if not _is_string(key_node):
                self.problem(key_node, f"keys of {what} must be names, not {_describe(key_node)}")
                continue
            key = str(key_node.value)
            if key in seen:
                first = seen[key].line
                where, _, _ = self.locate(first, 0)
                also = f" (first on line {where})" if where is not None else ""
                self.problem(key_node, f"{quote(key)} appears twice in {what}{also}")
                continue
            seen[key] = key_node
            items.append((key, key_node, value_node))
        return items

    def string(self, node: Node, what: str) -> str | None:
        if _is_string(node):
            return str(node.value)
        hint = " (quote it)" if isinstance(node, ScalarNode) and not _is_null(node) else ""
        self.problem(node, f"{what} must be a string, not {_describe(node)}{hint}")
        return None

    def items(self, node: Node, what: str, *, single_ok: bool) -> list[Node] | None:
        """The items of a list value; a lone scalar counts as a one-item list where allowed."""
        if isinstance(node, SequenceNode):
            return list(node.value)
        if single_ok and isinstance(node, ScalarNode) and not _is_null(node):
            return [node]
        self.problem(node, f"{what} must be a list, not {_describe(node)}")
        return None

    # -- the allowlist document ----------------------------------------------------------------

    def document(self, root: Node) -> _Document:
        doc = _Document()
        if not isinstance(root, MappingNode):
            self.problem(
                root,
                f"an allowlist must be a mapping with allow:/deny: lists, not {_describe(root)}",
            )
            return doc
        for key, key_node, value in self.mapping_items(root, "the allowlist"):
            if key == "mode":
                doc.mode = self.mode(value)
            elif key == "allow":
                doc.allow = self.rules(value, "allow")
            elif key == "deny":
                doc.deny = self.rules(value, "deny")
            elif key == "privateRanges":
                doc.private_ranges = self.private_ranges(value)
            else:
                allowed = ", ".join(TOP_KEYS)
                self.problem(
                    key_node,
                    f"unknown key {quote(key)}{_suggest(key, TOP_KEYS)}: "
                    f"the allowlist takes {allowed}",
                )
        return doc

    def mode(self, node: Node) -> Mode | None:
        text = node.value if _is_string(node) else None
        if text in ("enforce", "audit"):
            return Mode(text)
        self.problem(node, f'mode must be "enforce" or "audit", not {_describe(node)}')
        return None

    def private_ranges(self, node: Node) -> list[IPNetwork]:
        if _is_null(node):
            return []
        nodes = self.items(node, "privateRanges", single_ok=False)
        ranges: list[IPNetwork] = []
        seen: dict[IPNetwork, Node] = {}
        for item in nodes or []:
            text = self.string(item, "a privateRanges entry")
            if text is None:
                continue
            network = self.network(text.strip(), item)
            if network is None:
                continue
            if network in seen:
                self.problem(item, f"duplicate privateRanges entry {quote(text)}")
                continue
            seen[network] = item
            ranges.append(network)
            if network.prefixlen < _WIDE_PREFIX[network.version]:
                self.warn(item, _wide_message(network, "exempts from the private-address guard"))
        return ranges

    def rules(self, node: Node, list_name: str) -> list[Rule]:
        if _is_null(node):
            return []  # every entry commented out: an empty list
        entry = self._lists.get(id(node))
        if entry is not None and entry[0] is node:
            return entry[1].rules  # checked while composed
        checker = _RuleList(self, list_name)
        for index, item in enumerate(self.items(node, list_name, single_ok=False) or [], 1):
            checker.add(index, item)
        return checker.rules

    def breadth(self, rule: Rule, node: Node, *, broad: bool) -> bool:
        """False (problem recorded) for an allow rule too broad to be meant without saying so.

        A wildcard on an ICANN public suffix (``*.com``, ``*.co.uk``) admits every name anyone
        can register there; a default route (0.0.0.0/0, ::/0) every address, and a ``cidr``
        rule lifts the private-address guard where it matches. ``broad: true`` says it is meant.
        A wildcard on a private-section suffix (``*.github.io``, ``*.s3.amazonaws.com``) is
        one company's namespace, often used on purpose (``*.googleapis.com``): a warning only.
        """
        hint = "name the hosts, or write the rule as a mapping with broad: true"
        if rule.wildcard and rule.host is not None:
            written = quote(f"*.{rule.host}")
            if _public_suffixes(icann_only=False).is_public(rule.host):
                if _public_suffixes(icann_only=True).is_public(rule.host):
                    if not broad:
                        self.problem(
                            node,
                            f"{written} matches every name under the public suffix "
                            f"{quote(rule.host)}, which anyone can register: {hint}",
                        )
                        return False
                elif not broad:
                    self.warn(
                        node,
                        f"{written}: {quote(rule.host)} is a public suffix whose names belong "
                        "to different customers of one provider (Public Suffix List, private "
                        "section): every one of them matches",
                    )
        network = rule.network
        if network is not None and not broad:
            if network.prefixlen == 0:
                self.problem(
                    node,
                    f"{network} matches every address and lifts the private-address guard "
                    f"for all of them: {hint}",
                )
                return False
            if network.prefixlen < _WIDE_PREFIX[network.version]:
                self.warn(node, _wide_message(network, "allows"))
        return True

    def rule(self, node: Node, list_name: str, index: int = 0) -> tuple[Rule, bool] | None:
        """The rule and whether it says ``broad: true``; ``index``: its place in its list (from
        1), for messages that must say which rule is at fault."""
        line, _, _ = self.locate(node.line, node.column)
        if isinstance(node, MappingNode):
            return self.mapping_rule(node, line, list_name, index)
        if isinstance(node, ScalarNode):
            if _is_null(node):
                self.problem(node, f"empty {list_name} rule")
                return None
            text = self.string(node, f"an {list_name} rule")
            rule = None if text is None else self.string_rule(text, node, line)
            return None if rule is None else (rule, False)
        self.problem(
            node,
            f"an {list_name} rule must be a host, host:port, CIDR or a mapping "
            f"(host:/cidr:, ports:, methods:, paths:, broad:), not {_describe(node)}",
        )
        return None

    def string_rule(self, text: str, node: Node, line: int | None) -> Rule | None:
        stripped = text.strip()
        if not stripped:
            self.problem(node, "empty rule")
            return None
        if "://" in stripped:
            self.problem(
                node, f"{quote(stripped)} looks like a URL: write the host (and :port), not the URL"
            )
            return None
        if "/" in stripped:
            if parse_ip(stripped.split("/")[0]) is not None and ":" in stripped.split("/")[-1]:
                self.problem(
                    node,
                    f"{quote(stripped)}: a CIDR rule with a port needs the mapping form "
                    "{cidr: ..., ports: [...]}",
                )
                return None
            network = self.network(stripped, node)
            return None if network is None else Rule(text, network=network, line=line)
        try:
            host_text, port = split_host_port(stripped)
        except InvalidHost as exc:
            self.problem(node, f"{quote(stripped)} is not a valid rule: {exc.reason}")
            return None
        ports = None if port is None else frozenset({port})
        target = self.host_pattern(host_text, node)
        if target is None:
            return None
        if isinstance(target, tuple):
            host, wildcard = target
            return Rule(text, host=host, wildcard=wildcard, ports=ports, line=line)
        return Rule(text, network=target, ports=ports, line=line)

    def host_pattern(self, text: str, node: Node) -> tuple[str, bool] | IPNetwork | None:
        """(normalized host, wildcard) for a name, an /32 or /128 network for an IP literal."""
        written = text.strip()
        if not written:
            self.problem(node, "empty host")
            return None
        wildcard = written.startswith("*.")
        rest = written[2:] if wildcard else written
        if "*" in rest or not rest:
            self.problem(node, f"{quote(written)} is not a valid host pattern: {_WILDCARD_MESSAGE}")
            return None
        try:
            host = normalize_host_once(rest)
        except InvalidHost as exc:
            self.problem(node, f"{quote(written)} is not a valid host: {exc.reason}")
            return None
        address = parse_ip(host)
        if address is not None:
            if "%" in host:
                self.problem(node, f"{quote(written)}: zone ids (%...) are not supported in rules")
                return None
            if wildcard:
                self.problem(node, f"{quote(written)}: a wildcard cannot apply to an IP address")
                return None
            return ipaddress.ip_network(address)
        return host, wildcard

    def network(self, text: str, node: Node) -> IPNetwork | None:
        if "%" in text:
            self.problem(node, f"{quote(text)}: zone ids (%...) are not supported in rules")
            return None
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.problem(node, f"{quote(text)} is not a valid CIDR (e.g. 10.20.0.0/16 or fd00::/8)")
            return None
        self.problem(node, f"{quote(text)} has host bits set: did you mean {loose}?")
        return None

    def mapping_rule(
        self, node: MappingNode, line: int | None, list_name: str = "allow", index: int = 0
    ) -> tuple[Rule, bool] | None:
        text = _flow(node)
        values: dict[str, Node] = {}
        ok = True
        for key, key_node, value in self.mapping_items(node, "a rule"):
            if key not in RULE_KEYS:
                self.problem(
                    key_node,
                    f"unknown rule key {quote(key)}{_suggest(key, RULE_KEYS)}: a rule takes "
                    + ", ".join(RULE_KEYS),
                )
                ok = False
                continue
            values[key] = value
        # Every condition is checked even when the target is wrong: all problems, in one pass.
        ports = self.ports(values["ports"]) if "ports" in values else None
        methods = self.methods(values["methods"]) if "methods" in values else None
        paths = self.paths(values["paths"]) if "paths" in values else None
        broad = self.flag(values["broad"], "broad") if "broad" in values else False
        inspect = self.flag(values["inspect"], "inspect") if "inspect" in values else False
        ok = (
            ok
            and broad is not None
            and inspect is not None
            and all(
                values.get(k) is None or parsed is not None
                for k, parsed in (("ports", ports), ("methods", methods), ("paths", paths))
            )
        )

        host: str | None = None
        wildcard = False
        network: IPNetwork | None = None
        if ("host" in values) == ("cidr" in values):
            which = "both" if "host" in values else "neither"
            self.problem(node, f'a rule needs exactly one of "host" or "cidr" ({which} given)')
            return None
        if "host" in values:
            written = self.string(values["host"], "host")
            target = None if written is None else self.host_in_mapping(written, values["host"])
            if target is None:
                ok = False
            elif isinstance(target, tuple):
                host, wildcard = target
            else:
                network = target
        else:
            written = self.string(values["cidr"], "cidr")
            network = None if written is None else self.network(written.strip(), values["cidr"])
            ok = ok and network is not None

        if inspect and ok:
            ok = self.inspectable(values["inspect"], list_name, index, text, network)
        if not ok or broad is None or inspect is None:
            return None
        rule = Rule(
            text,
            host=host,
            wildcard=wildcard,
            network=network,
            ports=ports,
            methods=methods,
            paths=paths,
            line=line,
            inspect=inspect,
        )
        return rule, broad

    def inspectable(
        self, node: Node, list_name: str, index: int, text: str, network: IPNetwork | None
    ) -> bool:
        """``inspect: true`` is for host allow rules: a name to issue a leaf certificate for
        (not a cidr rule or an IP literal) and something to let through (not a deny rule).
        False (problem recorded, naming the rule by list and place) otherwise."""
        which = f"{list_name} rule {index} {quote(text, 120)}"
        if list_name != "allow":
            self.problem(
                node,
                f"{which}: inspect: true applies to allow rules only (a deny rule denies the "
                "host whatever is inside its TLS)",
            )
            return False
        if network is not None:
            self.problem(
                node,
                f"{which}: inspect: true applies to host rules only, not to cidr rules or IP "
                "addresses (a leaf certificate is issued for a host name)",
            )
            return False
        return True

    def flag(self, node: Node, what: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            return str(node.value).lower() in ("true", "yes", "on")
        self.problem(node, f"{what} must be true or false, not {_describe(node)}")
        return None

    def host_in_mapping(self, written: str, node: Node) -> tuple[str, bool] | IPNetwork | None:
        stripped = written.strip()
        try:
            bare, port = split_host_port(stripped)
        except InvalidHost as exc:
            self.problem(node, f"{quote(stripped)} is not a valid host: {exc.reason}")
            return None
        if port is not None:
            self.problem(node, f"host {quote(stripped)} carries a port: put it in ports: [{port}]")
            return None
        return self.host_pattern(bare, node)

    def ports(self, node: Node) -> frozenset[int] | None:
        items = self.items(node, "ports", single_ok=True)
        if items is None:
            return None
        if not items:
            self.problem(node, "ports: [] allows no port; leave ports out for 80 and 443")
            return None
        ports: set[int] = set()
        ok = True
        for item in items:
            port = self.port(item)
            if port is None:
                ok = False
            elif port in ports:
                self.problem(item, f"port {port} is listed twice")
                ok = False
            else:
                ports.add(port)
        if not ok:
            return None
        shared = frozenset(ports)
        return self._port_sets.setdefault(shared, shared)

    def port(self, node: Node) -> int | None:
        if not isinstance(node, ScalarNode) or node.tag != _INT:
            self.problem(node, f"a port must be a number from 1 to 65535, not {_describe(node)}")
            return None
        value = str(node.value)
        if not _DECIMAL_RE.fullmatch(value):
            self.problem(node, f"port {clip(value)} must be a decimal number from 1 to 65535")
            return None
        port = int(value)
        if port > 65535:
            self.problem(node, f"port {clip(port)} is out of range 1..65535")
            return None
        return port

    def methods(self, node: Node) -> frozenset[str] | None:
        items = self.items(node, "methods", single_ok=True)
        if items is None:
            return None
        if not items:
            self.problem(node, "methods: [] allows no method; leave methods out for any")
            return None
        methods: set[str] = set()
        ok = True
        for item in items:
            text = self.string(item, "a method")
            if text is None:
                ok = False
                continue
            if not _TOKEN_RE.fullmatch(text):
                self.problem(item, f"{quote(text)} is not an HTTP method (e.g. GET, POST)")
                ok = False
                continue
            method = text.upper()
            if method in methods:
                self.problem(item, f"method {clip(method)} is listed twice")
                ok = False
                continue
            methods.add(method)
        return frozenset(methods) if ok else None

    def paths(self, node: Node) -> tuple[PathPattern, ...] | None:
        items = self.items(node, "paths", single_ok=True)
        if items is None:
            return None
        if not items:
            self.problem(node, "paths: [] allows no path; leave paths out for any")
            return None
        patterns: list[PathPattern] = []
        seen: set[tuple[str, ...]] = set()
        ok = True
        for item in items:
            text = self.string(item, "a path")
            if text is None:
                ok = False
                continue
            if not text.startswith("/"):
                self.problem(item, f'path {quote(text)} must start with "/"')
                ok = False
                continue
            bad = _PATH_BAD_RE.search(text)
            if bad:
                why = (
                    "paths are compared without the query string or fragment"
                    if bad.group() in "?#"
                    else "spaces and control characters are not allowed"
                )
                self.problem(item, f"path {quote(text)} contains {bad.group()!r}: {why}")
                ok = False
                continue
            pattern = PathPattern.compile(text)
            if pattern.parts in seen:
                self.problem(item, f"path {quote(text)} is listed twice")
                ok = False
                continue
            seen.add(pattern.parts)
            patterns.append(pattern)
        return tuple(patterns) if ok else None


def _wide_message(network: IPNetwork, does: str) -> str:
    count = network.num_addresses
    return (
        f"{network} is very wide: it {does} 2^{count.bit_length() - 1} addresses; "
        "is a narrower range meant?"
    )


def _reader_message(exc: yaml.YAMLError) -> str:
    character = getattr(exc, "character", None)
    reason = getattr(exc, "reason", None)
    if isinstance(character, int):
        character = chr(character)
    if isinstance(character, str):
        return f"character {character!r} is not allowed ({reason or 'not printable'})"
    return str(reason or exc)


def _manifest_document(parser: _Parser, root: MappingNode, text: str) -> tuple[str, Locate] | None:
    """The embedded allowlist text of a ConfigMap manifest, and where its lines are."""
    items = {
        key: (key_node, value)
        for key, key_node, value in parser.mapping_items(root, "the manifest")
    }
    kind_entry = items.get("kind")
    kind = kind_entry[1].value if kind_entry and isinstance(kind_entry[1], ScalarNode) else None
    if kind != "ConfigMap":
        at = kind_entry[1] if kind_entry else root
        parser.problem(
            at,
            f"a manifest must be kind: ConfigMap with data.{ALLOWLIST_KEY}, "
            f"not kind: {clip(kind) if kind is not None else '(missing)'}",
        )
        return None
    data_entry = items.get("data")
    if data_entry is None or not isinstance(data_entry[1], MappingNode):
        at = data_entry[1] if data_entry else root
        parser.problem(at, f'the ConfigMap has no data mapping with an "{ALLOWLIST_KEY}" key')
        return None
    data = {key: value for key, _, value in parser.mapping_items(data_entry[1], "data")}
    value = data.get(ALLOWLIST_KEY)
    if value is None:
        has = clip(", ".join(sorted(data)) or "none", 200)
        parser.problem(
            data_entry[0], f'the ConfigMap has no "{ALLOWLIST_KEY}" key in data (it has: {has})'
        )
        return None
    if not _is_string(value):
        parser.problem(
            value, f"data.{ALLOWLIST_KEY} must be a string (use a | block), not {_describe(value)}"
        )
        return None
    embedded = str(value.value)
    return embedded, _locate_embedded(text, value, embedded, ALLOWLIST_KEY)


def _is_manifest(root: Node) -> bool:
    if not isinstance(root, MappingNode):
        return False
    keys = {k.value for k, _ in root.value if isinstance(k, ScalarNode)}
    return bool(keys & {"apiVersion", "kind"}) or ({"data", "metadata"} <= keys)


@dataclass(frozen=True, slots=True)
class Parsed:
    """An accepted document: the policy, and warnings worth showing (validate prints them,
    the sidecar logs them on load)."""

    policy: Policy
    warnings: tuple[Problem, ...] = ()


def _parse(text: str, limits: Limits) -> tuple[_Document, str, list[Problem], list[Problem]]:
    """(document, allowlist text, errors, warnings)."""
    deadline = time.monotonic() + limits.seconds
    outer = _Parser(_locate_plain, limits, deadline)
    inner: _Parser | None = None
    doc, document_text = _Document(), text
    try:
        root = outer.compose(text)
        if root is not None and not _is_manifest(root):
            doc = outer.document(root)
        elif isinstance(root, MappingNode):
            found = _manifest_document(outer, root, text)
            if found is not None:
                document_text, locate = found
                inner = _Parser(locate, limits, deadline)
                inner_root = inner.compose(document_text)
                if inner_root is not None:
                    doc = inner.document(inner_root)
    except _TooCostlyError:
        pass  # the problem is recorded; nothing more is parsed
    parsers = [outer] if inner is None else [outer, inner]
    errors = [p for parser in parsers for p in parser.problems]
    warnings = [p for parser in parsers for p in parser.warnings]
    return doc, document_text, errors, warnings


def load_allowlist(
    text: str, *, source: str, version: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> Parsed:
    """Parse a bare allowlist document or a ConfigMap manifest holding one, with its warnings.

    ``version`` defaults to the digest of the allowlist document itself (for a manifest: of its
    ``allowlist.yaml`` value), so re-wrapping the same rules does not change the version.
    Raises AllowlistError listing every problem. The cost is bounded by ``limits`` (size, depth,
    alias expansion, time): a document past one is rejected with a problem naming the limit.
    """
    doc, document_text, problems, warnings = _parse(text, limits)
    if problems:
        raise AllowlistError(problems, source=source)
    meta = PolicyMeta(
        source=source,
        version=version if version is not None else digest(document_text),
        mode=doc.mode,
    )
    return Parsed(Policy(meta, doc.allow, doc.deny, doc.private_ranges), tuple(warnings))


def parse_allowlist(text: str, *, source: str, version: str | None = None) -> Policy:
    """``load_allowlist`` without the warnings."""
    return load_allowlist(text, source=source, version=version).policy


def validate_text(text: str, *, source: str) -> list[Problem]:
    """Every problem of a document (empty: it is valid)."""
    try:
        parse_allowlist(text, source=source)
    except AllowlistError as exc:
        return list(exc.problems)
    return []
