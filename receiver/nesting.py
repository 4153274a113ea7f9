"""How deep JSON may nest: deeper than `MAX_JSON_DEPTH` is quarantined, saying how deep it was.

Python's JSON parser recurses, so JSON nested about a thousand levels deep
(valid JSON) raised ``RecursionError``: called "invalid JSON" for a JSON
content type and, as ``text/plain``, sent down the internal-error path. Now
parsing has a documented limit, checked whatever the content type: up to
`MAX_JSON_DEPTH` levels a body is parsed (and everything after, flattening
and re-encoding, stays far from the interpreter's recursion limit); deeper, it
is quarantined with the depth and the limit in the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from receiver.columns import JsonValue
from receiver.errors import Quarantine

MAX_JSON_DEPTH = 512
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class TooDeep(Quarantine):
    """JSON nested past `MAX_JSON_DEPTH`."""

    def __init__(self, depth: int) -> None:
        super().__init__(
            f"JSON nested {depth} levels deep, past the limit of {MAX_JSON_DEPTH} levels"
        )
        self.depth = depth


def text_depth(text: str) -> int:
    """The deepest nesting of brackets in ``text`` outside JSON strings."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def value_depth(value: JsonValue) -> int:
    """How deep ``value`` nests (a scalar is 0, ``[]`` is 1), without recursing."""
    deepest = 0
    stack: list[tuple[JsonValue, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_within_depth(text: str, parse: Callable[[str], JsonValue]) -> JsonValue:
    """``parse(text)``, or `TooDeep` when it nests past `MAX_JSON_DEPTH`."""
    try:
        value = parse(text)
    except RecursionError:
        raise TooDeep(text_depth(text)) from None
    # Only text with enough brackets can be too deep: most bodies skip the walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        depth = value_depth(value)
        if depth > MAX_JSON_DEPTH:
            raise TooDeep(depth)
    return value
