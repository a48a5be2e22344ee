"""A strict YAML loader on ``yaml.SafeLoader``: no duplicate keys, bounded nesting, and aliases that cannot explode.

``position`` and ``describe`` turn any of its errors (pyyaml's syntax errors too) into FILE:LINE:COLUMN: problem.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import CollectionNode, MappingNode, Node, ScalarNode

MAX_DEPTH = 32  # levels of mappings and sequences, the top-level one included
MAX_ALIAS_NODES = 10_000  # values that all the aliases of one document may repeat, together

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYAMLError(ValueError):
    """A document that is valid YAML but refused by the strict loader; the message names the line."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line = line  # 1-based, None when unknown
        self.column = column  # 1-based, None when unknown


def load(text: str, max_depth: int = MAX_DEPTH, max_alias_nodes: int = MAX_ALIAS_NODES) -> Any:
    """The single YAML document in ``text``, loaded like ``yaml.safe_load`` but strictly.

    Raises StrictYAMLError for a duplicate mapping key, nesting deeper than ``max_depth`` levels (aliases
    included), a recursive alias, or aliases that together repeat more than ``max_alias_nodes`` values.
    Syntax errors come through as ``yaml.YAMLError`` (a ``MarkedYAMLError`` names the line and column).
    """
    loader = StrictLoader(text, max_depth=max_depth, max_alias_nodes=max_alias_nodes)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def position(exc: Exception) -> tuple[int, int] | None:
    """Where a YAML error happened, as (line, column) counted from 1; None when no mark is known.

    A StrictYAMLError carries its own line and column; a ``yaml.MarkedYAMLError`` its ``problem_mark``.
    """
    if isinstance(exc, StrictYAMLError):
        return None if exc.line is None else (exc.line, exc.column or 1)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return None if mark is None else (mark.line + 1, mark.column + 1)


def describe(exc: Exception) -> str:
    """A YAML error in one line, without its position (pyyaml's own text spreads it over four).

    E.g. "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence started at 1:8)".
    """
    problem = getattr(exc, "problem", None)
    if isinstance(exc, StrictYAMLError) or not problem:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    if not context:
        return problem
    mark = getattr(exc, "context_mark", None)
    if mark is None or mark is getattr(exc, "problem_mark", None):
        return f"{problem} ({context})"
    return f"{problem} ({context} started at {mark.line + 1}:{mark.column + 1})"


def _line(node_or_event: Any) -> int | None:
    mark = getattr(node_or_event, "start_mark", None)
    return None if mark is None else mark.line + 1


def _column(node_or_event: Any) -> int | None:
    mark = getattr(node_or_event, "start_mark", None)
    return None if mark is None else mark.column + 1


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that checks depth and alias expansion while composing, and duplicate keys while constructing.

    Depth is counted as collections open, before their contents are composed, so a document of thousands of
    nested brackets is refused at the first level too deep instead of recursing until RecursionError.
    """

    def __init__(self, stream: Any, max_depth: int = MAX_DEPTH, max_alias_nodes: int = MAX_ALIAS_NODES) -> None:
        super().__init__(stream)
        self.max_depth = max_depth
        self.max_alias_nodes = max_alias_nodes
        self._depth = 0  # collections being composed right now
        self._alias_nodes = 0  # values repeated through aliases so far
        self._expanded: dict[int, tuple[int, int]] = {}  # id(collection node) -> (values, height), once composed

    # -- composing --------------------------------------------------------------------------------------------

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        event = self.peek_event()
        node = super().compose_node(parent, index)
        self._check_alias(node, event)
        return node

    def compose_sequence_node(self, anchor: str | None) -> Node:
        return self._compose_collection(super().compose_sequence_node, anchor)

    def compose_mapping_node(self, anchor: str | None) -> Node:
        return self._compose_collection(super().compose_mapping_node, anchor)

    def _compose_collection(self, compose: Any, anchor: str | None) -> Node:
        if self._depth >= self.max_depth:
            event = self.peek_event()
            raise StrictYAMLError(self._too_deep(_line(event)), _line(event), _column(event))
        self._depth += 1
        try:
            node = compose(anchor)
        finally:
            self._depth -= 1
        children = [item for pair in node.value for item in pair] if isinstance(node, MappingNode) else node.value
        values, height = 1, 0
        for child in children:
            child_values, child_height = self._expanded.get(id(child), (1, 0))
            values += child_values
            height = max(height, child_height)
        self._expanded[id(node)] = (values, height + 1)
        return node

    def _check_alias(self, node: Node, event: Any) -> None:
        line, column = _line(event), _column(event)
        if isinstance(node, CollectionNode) and id(node) not in self._expanded:
            raise StrictYAMLError(
                f"alias `*{event.anchor}` on line {line} refers to a collection that holds it", line, column
            )
        values, height = self._expanded.get(id(node), (1, 0))
        if self._depth + height > self.max_depth:
            raise StrictYAMLError(self._too_deep(line) + f" (through alias `*{event.anchor}`)", line, column)
        self._alias_nodes += values
        if self._alias_nodes > self.max_alias_nodes:
            raise StrictYAMLError(
                f"aliases repeat more than {self.max_alias_nodes} values (limit reached by `*{event.anchor}` "
                f"on line {line}); write the values out instead",
                line,
                column,
            )

    def _too_deep(self, line: int | None) -> str:
        return f"nested deeper than {self.max_depth} levels at line {line}"

    # -- constructing -----------------------------------------------------------------------------------------

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """SafeConstructor's value, or StrictYAMLError naming the line for one it cannot build.

        pyyaml's scalar constructors raise plain Python errors for values its resolver accepted (`0x_`, a date
        `2024-13-45`, an int of more than 4300 digits, `!!int foo`, `!!bool x`, `!!timestamp x`).
        """
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, StrictYAMLError, MemoryError):
            raise
        except Exception as exc:
            if not isinstance(node, ScalarNode):
                raise
            line, column = _line(node), _column(node)
            shown = str(node.value).replace("\r", "\\r").replace("\n", "\\n")
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            kind = str(node.tag).removeprefix("tag:yaml.org,2002:")
            detail = " ".join(str(exc).split()) if isinstance(exc, (ValueError, OverflowError)) else ""
            detail = f" ({detail[:197] + '...' if len(detail) > 200 else detail})" if detail else ""
            raise StrictYAMLError(
                f"`{shown}` on line {line} is not a valid {kind} value{detail}; quote it to keep it as text",
                line,
                column,
            ) from None

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            first: dict[Any, int | None] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *defaults` merges may be overridden, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: SafeConstructor refuses it with its own message
                    continue
                line = _line(key_node)
                if seen:
                    shown = str(key) if len(str(key)) <= 60 else str(key)[:57] + "..."
                    raise StrictYAMLError(
                        f"duplicate key `{shown}` on line {line} (first on line {first[key]})", line, _column(key_node)
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def dump_exact(data: Any) -> str:
    """YAML text that loads back as exactly `data`: readable Unicode where that holds, escapes where it does not.

    PyYAML writes U+0085, U+2028 and U+2029 raw with allow_unicode, and reads them back as line breaks (a prompt
    "a\u2028b" would come back as "a b"); such data is written with every non-ASCII character escaped instead.
    """
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) == data:
        return text
    return yaml.safe_dump(data, sort_keys=False)
