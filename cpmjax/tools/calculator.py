"""A safe arithmetic evaluator: numbers, ``+ - * / // % **``, unary signs and parentheses,
walked over ``ast`` nodes (never ``eval``). No names, attributes, calls or subscripts.

Every operation is bounded before it runs: integers stay under ``MAX_INT_BITS`` bits (a power
or a product whose result would be larger is refused without computing it), floats must stay
finite, and the expression is at most ``MAX_CHARS`` characters."""

from __future__ import annotations

import ast
import math
import operator

from cpmjax.errors import ToolExecutionError

__all__ = ["MAX_CHARS", "MAX_INT_BITS", "evaluate"]

MAX_CHARS = 1000
MAX_INT_BITS = 4096

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


def _fail(message: str) -> ToolExecutionError:
    return ToolExecutionError(f"calculator: {message}")


def _check_bounds(op: type, a: float, b: float) -> None:
    """Refuse an integer operation whose result would exceed ``MAX_INT_BITS``."""
    if op is ast.Pow:
        if isinstance(a, int) and isinstance(b, int):
            if b < 0:
                return  # a float result; overflow is caught below
            if abs(a) > 1 and a.bit_length() * b > MAX_INT_BITS:
                raise _fail(f"{a} ** {b} is too large (over {MAX_INT_BITS} bits)")
        elif abs(b) > 10_000:  # float powers: overflow raises, but bound the work anyway
            if abs(a) not in (0, 1):
                raise _fail(f"exponent {b} is too large")
    elif op is ast.Mult and isinstance(a, int) and isinstance(b, int):
        if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise _fail(f"product is too large (over {MAX_INT_BITS} bits)")


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise _fail(f"{node.value!r} is not a number")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        _check_bounds(type(node.op), a, b)
        try:
            result = _BINARY[type(node.op)](a, b)
        except ZeroDivisionError:
            raise _fail("division by zero") from None
        except OverflowError:
            raise _fail("result is too large") from None
        if isinstance(result, complex):
            raise _fail("result is a complex number")
        if isinstance(result, float) and not math.isfinite(result):
            raise _fail("result is not a finite number")
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise _fail(f"result is too large (over {MAX_INT_BITS} bits)")
        return result
    if isinstance(node, ast.Name):
        raise _fail(f"names are not allowed ({node.id!r}); write numbers and operators only")
    raise _fail(f"{type(node).__name__} is not allowed; write numbers, + - * / // % ** and "
                "parentheses only")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression such as ``"(12 + 30) * 2 ** 3 / 7"``.

    Raises ``ToolExecutionError`` naming the offending part for anything else (names,
    attributes, calls, too-large numbers, division by zero, over ``MAX_CHARS`` characters)."""
    if not isinstance(expression, str):
        raise _fail(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise _fail(f"expression has {len(expression)} characters (at most {MAX_CHARS})")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _fail(f"cannot parse {expression!r}: {exc}") from None
    try:
        return _eval(tree.body)
    except RecursionError:
        raise _fail("expression is nested too deeply") from None
