"""What a model asked for and what it got back: ``ToolCall``, ``Reply`` and ``Observation``."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Observation", "Reply", "ToolCall"]


@dataclasses.dataclass
class ToolCall:
    """One call: a tool name and its keyword arguments (JSON values)."""

    name: str
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclasses.dataclass
class Reply:
    """One model reply, parsed: its thought, the calls it makes, or its final answer.

    ``error`` is set (a ``ToolCallParseError``) when the reply tried to call a tool but the call
    is malformed; ``calls`` is then empty and ``answer`` None."""

    text: str
    thought: str = ""
    calls: list[ToolCall] = dataclasses.field(default_factory=list)
    answer: str | None = None
    error: Exception | None = None


@dataclasses.dataclass
class Observation:
    """The result of one call as the model will see it. ``error`` is None on success, else a
    short kind: ``unparseable``, ``unknown_tool``, ``invalid_arguments``, ``tool_error``,
    ``timeout``, ``memory``, ``crash``, ``output_limit``, ``forbidden``."""

    name: str
    content: str
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "content": self.content, "error": self.error,
                "seconds": round(self.seconds, 6)}
