"""``ToolRegistry``: Python callables as tools, their JSON schemas (from type hints and the
docstring, by ``transformers.utils.get_json_schema``), argument validation (``jsonschema``,
before any call) and execution that turns every failure into an ``Observation``."""

from __future__ import annotations

import copy
import dataclasses
import json
import keyword
import time
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema

from cpmjax.errors import (
    ToolArgumentsError,
    ToolDefinitionError,
    ToolError,
    ToolExecutionError,
    UnknownToolError,
)
from cpmjax.tools.calls import Observation, ToolCall
from cpmjax.tools.sandbox import Sandbox

__all__ = ["DEFAULT_MAX_OBSERVATION_CHARS", "Tool", "ToolRegistry", "schema_for"]

DEFAULT_MAX_OBSERVATION_CHARS = 4000


def _normalise(schema: Any) -> Any:
    """Standard JSON schema from ``get_json_schema``'s output: ``nullable: true`` becomes a
    ``"null"`` alternative of the type (jsonschema ignores ``nullable``)."""
    if isinstance(schema, dict):
        out = {k: _normalise(v) for k, v in schema.items() if k != "nullable"}
        if schema.get("nullable"):
            kind = out.get("type")
            if isinstance(kind, str):
                out["type"] = [kind, "null"]
            elif isinstance(kind, list) and "null" not in kind:
                out["type"] = [*kind, "null"]
        return out
    if isinstance(schema, list):
        return [_normalise(v) for v in schema]
    return schema


def schema_for(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{"name", "description", "parameters"}`` of a typed, documented function (every
    argument typed and described under ``Args:`` in its docstring). Raises
    ``ToolDefinitionError`` naming the function when that cannot be derived."""
    from transformers.utils import get_json_schema

    name = getattr(fn, "__name__", repr(fn))
    try:
        function = get_json_schema(fn)["function"]
    except Exception as exc:  # transformers raises its own exception types
        raise ToolDefinitionError(
            f"cannot derive a JSON schema for tool {name!r}: {exc} (type every argument and "
            "describe each under 'Args:' in the docstring)") from None
    parameters = _normalise(function.get("parameters") or {"type": "object", "properties": {}})
    parameters.setdefault("properties", {})
    parameters["additionalProperties"] = False
    return {"name": function["name"], "description": function.get("description", ""),
            "parameters": parameters}


@dataclasses.dataclass
class Tool:
    """A registered tool. ``sandboxed`` tools run out of process (``Sandbox.call``): their
    source must be self-contained (imports inside the body, standard library only)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    sandboxed: bool = False

    def schema(self) -> dict[str, Any]:
        """The tool in the chat-template ``tools=`` shape (``{"type": "function", ...}``)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": copy.deepcopy(self.parameters)}}


def _check_name(name: str, what: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ToolDefinitionError(
            f"{what} {name!r} is not a Python identifier (calls are written as Python)")


class ToolRegistry:
    """Tools by name. ``register`` a typed, documented function (also as a decorator);
    ``validate`` a call against its schema; ``execute`` a call (never raises: every failure is
    an ``Observation`` with an ``error`` kind)."""

    def __init__(self, tools: list[Tool] | None = None, *, sandbox: Sandbox | None = None,
                 max_observation_chars: int = DEFAULT_MAX_OBSERVATION_CHARS) -> None:
        self._tools: dict[str, Tool] = {}
        self._sandbox = sandbox
        self.max_observation_chars = max_observation_chars
        for tool in tools or ():
            self.add(tool)

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox sandboxed tools run in (a default ``Sandbox()`` unless one was given)."""
        if self._sandbox is None:
            self._sandbox = Sandbox()
        return self._sandbox

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 sandboxed: bool = False) -> Any:
        """Register ``fn`` (typed arguments, a docstring with ``Args:``) and return it; usable
        as ``@registry.register`` or ``@registry.register(sandboxed=True)``."""
        if fn is None:
            return lambda f: self.register(f, name=name, sandboxed=sandboxed)
        schema = schema_for(fn)
        self.add(Tool(name=name or schema["name"], description=schema["description"],
                      parameters=schema["parameters"], fn=fn, sandboxed=sandboxed))
        return fn

    def add(self, tool: Tool) -> None:
        """Add a ``Tool``; its name and argument names must be Python identifiers."""
        _check_name(tool.name, "tool name")
        for argument in tool.parameters.get("properties", {}):
            _check_name(argument, f"argument of tool {tool.name!r}")
        if tool.name in self._tools:
            raise ToolDefinitionError(f"a tool named {tool.name!r} is already registered")
        try:
            jsonschema.Draft202012Validator.check_schema(tool.parameters)
        except jsonschema.SchemaError as exc:
            raise ToolDefinitionError(
                f"tool {tool.name!r} has an invalid parameter schema: {exc.message}") from None
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownToolError(f"unknown tool {name!r}; available: {known}")
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """Every tool in the chat-template ``tools=`` shape."""
        return [tool.schema() for tool in self._tools.values()]

    def validate(self, call: ToolCall) -> Tool:
        """The tool ``call`` names, after checking its arguments against the schema. Raises
        ``UnknownToolError`` or ``ToolArgumentsError`` (naming the argument at fault)."""
        tool = self.get(call.name)
        if not isinstance(call.arguments, dict):
            raise ToolArgumentsError(f"{call.name}: arguments must be a JSON object")
        validator = jsonschema.Draft202012Validator(tool.parameters)
        error = jsonschema.exceptions.best_match(validator.iter_errors(call.arguments))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            raise ToolArgumentsError(
                f"{call.name}: {'argument ' + where + ': ' if where else ''}{error.message}")
        return tool

    def execute(self, call: ToolCall) -> Observation:
        """Run one call; every failure (unknown tool, invalid arguments, the tool raising, a
        sandbox limit, an oversized result) comes back as an ``Observation`` with ``error``."""
        start = time.perf_counter()
        try:
            tool = self.validate(call)
            if tool.sandboxed:
                result = self.sandbox.call(tool, call.arguments)
                if not result.ok:
                    detail = result.exception or result.stderr.strip()[-500:] or result.error
                    raise ToolExecutionError(f"{call.name}: {detail}", kind=result.error)
                value = result.value
            else:
                value = tool.fn(**call.arguments)
            content, error = _content(value), None
        except ToolError as exc:
            content, error = str(exc), exc.kind
        except Exception as exc:  # noqa: BLE001 - a tool's own failure is an observation
            content, error = f"{call.name} raised {type(exc).__name__}: {exc}", "tool_error"
        if len(content) > self.max_observation_chars:
            content = (content[: self.max_observation_chars]
                       + f"... [cut: {len(content)} characters, at most "
                       f"{self.max_observation_chars}]")
            error = error or "output_limit"
        return Observation(call.name, content, error, time.perf_counter() - start)


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)
