"""Built-in tools: ``calculator`` (safe arithmetic), ``python`` (code in the ``Sandbox``) and
``key_value_tool`` (a lookup in a given store). Each returns a ``Tool`` for a registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpmjax.errors import ToolExecutionError
from cpmjax.tools.calculator import evaluate
from cpmjax.tools.registry import Tool, schema_for
from cpmjax.tools.sandbox import Sandbox

__all__ = ["BUILTINS", "calculator_tool", "key_value_tool", "python_tool"]


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression with numbers, + - * / // % ** and parentheses.

    Args:
        expression: The expression, for example "(12 + 30) * 4 / 7".
    """
    return evaluate(expression)


def python(code: str) -> str:
    """Run Python code in a sandbox and return what it prints.

    Args:
        code: A Python script; print the results you need.
    """
    raise NotImplementedError  # the schema only: python_tool() binds a sandbox


def lookup(key: str) -> str:
    """Look up the value stored under a key.

    Args:
        key: The exact key to look up.
    """
    raise NotImplementedError  # the schema only: key_value_tool() binds a store


def _tool(template: Any, fn: Any, name: str | None = None,
          description: str | None = None) -> Tool:
    schema = schema_for(template)
    return Tool(name=name or schema["name"], description=description or schema["description"],
                parameters=schema["parameters"], fn=fn)


def calculator_tool() -> Tool:
    """The ``calculator`` tool (``cpmjax.tools.calculator.evaluate``; in process: it is a
    bounded ``ast`` walk that runs no code)."""
    return _tool(calculator, calculator)


def python_tool(sandbox: Sandbox | None = None) -> Tool:
    """The ``python`` tool: runs the code in ``sandbox`` (default ``Sandbox()``) and returns
    its stdout; a failure (exception, timeout, memory, output limit, forbidden action) raises
    ``ToolExecutionError`` whose ``kind`` is the sandbox's error."""
    box = sandbox or Sandbox()

    def run(code: str) -> str:
        result = box.run_python(code)
        if result.ok:
            return result.stdout if result.stdout else "(no output)"
        detail = result.stderr.strip()[-1000:] or result.exception or ""
        raise ToolExecutionError(
            f"python: {result.error}" + (f"\n{detail}" if detail else "")
            + (f"\nstdout: {result.stdout[-500:]}" if result.stdout else ""),
            kind=result.error)

    return _tool(python, run)


def key_value_tool(store: Mapping[str, Any], *, name: str = "lookup",
                   description: str | None = None) -> Tool:
    """A tool that returns ``store[key]``; an unknown key is an error listing a few known
    keys."""
    data = dict(store)

    def get(key: str) -> Any:
        if key not in data:
            known = ", ".join(repr(k) for k in sorted(data)[:10]) or "none"
            raise ToolExecutionError(f"{name}: no key {key!r} (known keys include {known})")
        return data[key]

    return _tool(lookup, get, name=name, description=description)


BUILTINS = ("calculator", "python", "lookup")
