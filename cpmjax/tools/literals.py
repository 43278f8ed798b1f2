"""Python literals in and out, for tool-call arguments: JSON values written as Python source
(``'a\\nb'``, ``[1, 2.5]``, ``{'k': None}``, ``True``) and read back with ``ast`` only.

Reading never evaluates anything: a node that is not a literal (a name, a call, an attribute,
an operator other than a sign on a number) is refused with ``ToolCallParseError``."""

from __future__ import annotations

import ast
import math
from typing import Any

from cpmjax.errors import ToolCallParseError, ToolError

__all__ = ["from_literal_node", "parse_literal", "to_literal"]

_MAX_DEPTH = 32


def to_literal(value: Any, _depth: int = 0) -> str:
    """Python source of a JSON value (str, int, float, bool, None, list/tuple, dict with str
    keys). Raises ``ToolError`` for anything else (non-finite floats, other key types...)."""
    if _depth > _MAX_DEPTH:
        raise ToolError(f"argument nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return repr(value)
    if isinstance(value, int):
        try:
            return repr(value)
        except ValueError as exc:  # more digits than int's str limit
            raise ToolError(f"integer argument too large to write: {exc}") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError(f"argument {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_literal(v, _depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise ToolError(f"argument dict key {k!r} is not a string")
            items.append(f"{k!r}: {to_literal(v, _depth + 1)}")
        return "{" + ", ".join(items) + "}"
    raise ToolError(f"argument of type {type(value).__name__} is not a JSON value")


def from_literal_node(node: ast.AST, _depth: int = 0) -> Any:
    """The JSON value an ``ast`` literal node stands for (tuples become lists)."""
    if _depth > _MAX_DEPTH:
        raise ToolCallParseError(f"argument nested deeper than {_MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ToolCallParseError(f"literal {ast.unparse(node)[:40]} is not a JSON value")
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        value = node.operand.value
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [from_literal_node(e, _depth + 1) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                raise ToolCallParseError("'**' inside a dict argument is not a literal")
            key = from_literal_node(k, _depth + 1)
            if not isinstance(key, str):
                raise ToolCallParseError(f"dict key {key!r} is not a string")
            out[key] = from_literal_node(v, _depth + 1)
        return out
    try:
        shown = ast.unparse(node)[:60]
    except Exception:  # noqa: BLE001 - only for the message
        shown = type(node).__name__
    raise ToolCallParseError(
        f"argument {shown!r} is not a literal value (only strings, numbers, True/False/None, "
        "lists and dicts; no names, calls or expressions)")


def parse_literal(text: str) -> Any:
    """The JSON value a Python literal in ``text`` stands for (``ast``, never evaluated)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolCallParseError(f"not a Python literal: {exc}") from None
    return from_literal_node(tree.body)
