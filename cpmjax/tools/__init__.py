"""Tool use: a registry of Python tools with JSON schemas, the MiniCPM3 and ReAct call
formats, a sandbox for code, and the ReAct and DFSDT agents over ``cpmjax.generate``.

Modules (imports run downwards in this list): ``cli`` (``cpmjax chat``); ``dfsdt``;
``agents`` (ReAct, one step, the trace); ``policy`` (prompt -> reply; ``ModelPolicy`` over
``cpmjax.generate``); ``builtins`` (calculator, python, key-value lookup); ``registry``;
``formats``; ``literals``; ``calculator``; ``sandbox`` (runs ``_child.py`` as a separate
process); ``calls`` (``ToolCall``, ``Reply``, ``Observation``). The tool model: ``synth`` (synthetic
tasks and transcripts), ``training`` (its tokenizer, the assistant-only loss mask, training,
``cpmjax-tools``) and ``experiment`` (the held-out evaluation); import them by module, they
are not re-exported here. See docs/tools.md."""

from cpmjax.tools.agents import AgentResult, Step, react, run_step, system_prompt
from cpmjax.tools.builtins import BUILTINS, calculator_tool, key_value_tool, python_tool
from cpmjax.tools.calculator import evaluate
from cpmjax.tools.calls import Observation, Reply, ToolCall
from cpmjax.tools.dfsdt import GIVE_UP, dfsdt, diversity_note
from cpmjax.tools.formats import (
    FORMATS,
    Format,
    Turn,
    get_format,
    parse_reply,
    parse_tool_calls,
    render_reply,
    render_tool_calls,
)
from cpmjax.tools.policy import Completion, ModelPolicy, Policy
from cpmjax.tools.registry import Tool, ToolRegistry, schema_for
from cpmjax.tools.sandbox import ERRORS, Sandbox, SandboxResult

__all__ = [
    "BUILTINS",
    "ERRORS",
    "FORMATS",
    "GIVE_UP",
    "AgentResult",
    "Completion",
    "Format",
    "ModelPolicy",
    "Observation",
    "Policy",
    "Reply",
    "Sandbox",
    "SandboxResult",
    "Step",
    "Tool",
    "ToolCall",
    "ToolRegistry",
    "Turn",
    "calculator_tool",
    "dfsdt",
    "diversity_note",
    "evaluate",
    "get_format",
    "key_value_tool",
    "parse_reply",
    "parse_tool_calls",
    "python_tool",
    "react",
    "render_reply",
    "render_tool_calls",
    "run_step",
    "schema_for",
    "system_prompt",
]
