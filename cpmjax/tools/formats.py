"""The two tool-call formats: how calls are written, read back, and how a conversation with
tools becomes a prompt.

- ``minicpm3``, the MiniCPM3 function-call format: the tools are described in the system
  message as Python function stubs; a reply is ``<|thought_start|>\\n...\\n<|thought_end|>\\n``
  then ``<|tool_call_start|>\\n```python\\nname(key=value, ...)\\n```\\n<|tool_call_end|>`` (one
  call per line, keyword arguments with literal values); results come back as ``tool``
  messages; a reply without a call block is the answer.
- ``react``: ``Thought: ...`` / ``Action: name`` / ``Action Input: {json}``, results as
  ``Observation: ...`` lines, and ``Final Answer: ...``.

Calls are read with ``ast`` (``minicpm3``) or ``json`` (``react``); nothing is evaluated."""

from __future__ import annotations

import ast
import dataclasses
import json
import keyword
import re
from collections.abc import Sequence
from typing import Any

from cpmjax.errors import ConfigError, ToolCallParseError, ToolError
from cpmjax.tools.calls import Observation, Reply, ToolCall
from cpmjax.tools.literals import from_literal_node, parse_literal, to_literal

__all__ = [
    "CALL_END",
    "CALL_START",
    "FORMATS",
    "THOUGHT_END",
    "THOUGHT_START",
    "Format",
    "Turn",
    "chat_text",
    "get_format",
    "observation_text",
    "parse_reply",
    "parse_tool_calls",
    "render_reply",
    "render_tool_calls",
]

THOUGHT_START, THOUGHT_END = "<|thought_start|>", "<|thought_end|>"
CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
IM_END = "<|im_end|>"
_MAX_TEXT = 100_000


@dataclasses.dataclass
class Turn:
    """One earlier step of a conversation: the model's reply text and what its calls got."""

    text: str
    observations: list[Observation] = dataclasses.field(default_factory=list)


def observation_text(observation: Observation) -> str:
    """What the model reads for one result: the content, or ``Error (kind): message``."""
    if observation.ok:
        return observation.content
    return f"Error ({observation.error}): {observation.content}"


def _check_call(call: ToolCall) -> None:
    if not isinstance(call.name, str) or not call.name.isidentifier():
        raise ToolError(f"tool name {call.name!r} is not a Python identifier")
    if not isinstance(call.arguments, dict):
        raise ToolError(f"arguments of {call.name} must be a dict")
    for key in call.arguments:
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            raise ToolError(f"argument name {key!r} of {call.name} is not a Python identifier")


# -- JSON-schema types as Python hints (the minicpm3 tool description) ---------------------

_HINTS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool",
          "null": "None"}


def _hint(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return "Literal[" + ", ".join(to_literal(v) for v in spec["enum"]) + "]"
    kind = spec.get("type")
    if isinstance(kind, list):
        others = [k for k in kind if k != "null"]
        inner = _hint({**spec, "type": others[0]}) if len(others) == 1 else (
            "Union[" + ", ".join(_hint({**spec, "type": k}) for k in others) + "]")
        return f"Optional[{inner}]" if "null" in kind else inner
    if kind == "array":
        return f"List[{_hint(spec.get('items') or {})}]"
    if kind == "object":
        return "Dict[str, Any]"
    return _HINTS.get(kind, "Any")


def _stub(tool: dict[str, Any]) -> str:
    function = tool.get("function", tool)
    params = function.get("parameters") or {}
    required = set(params.get("required", ()))
    props = params.get("properties", {})
    args = []
    for name, spec in props.items():
        hint = _hint(spec)
        if name in required:
            args.append(f"{name}: {hint}")
        else:
            args.append(f"{name}: {hint} = {to_literal(spec.get('default'))}")
    lines = [f"def {function['name']}({', '.join(args)}):",
             f'    """{function.get("description", "").strip()}']
    if props:
        lines += ["", "    Args:"]
        lines += [f"        {n}: {s.get('description', '').strip()}" for n, s in props.items()]
    lines.append('    """')
    return "\n".join(lines)


# -- chat rendering -------------------------------------------------------------------------

def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text of ``messages`` (role / content) with the assistant's turn opened:
    through the tokenizer's chat template when it has one, else ChatML markers."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as first:  # noqa: BLE001 - some templates know no 'tool' role
            plain = [m if m["role"] != "tool" else {"role": "user", "content":
                                                    "Tool result: " + m["content"]}
                     for m in messages]
            try:
                return tokenizer.apply_chat_template(plain, tokenize=False,
                                                     add_generation_prompt=True)
            except Exception:  # noqa: BLE001
                raise ConfigError(f"the tokenizer's chat template failed: {first}") from None
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + "<|im_start|>assistant\n"


class Format:
    """A tool-call format: ``render`` calls, ``parse`` a reply, build a ``prompt``."""

    name = ""
    stop_strings: tuple[str, ...] = ()
    keep_stop: tuple[str, ...] = ()  # stop strings that stay in the reply text

    def render(self, calls: Sequence[ToolCall], thought: str | None = None,
               answer: str | None = None) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> Reply:
        raise NotImplementedError

    def describe_tools(self, tools: list[dict[str, Any]], extra_rules: str = "") -> str:
        raise NotImplementedError

    def prompt(self, tokenizer: Any, system: str, query: str, turns: Sequence[Turn],
               note: str | None = None) -> str:
        raise NotImplementedError


class MiniCPM3Format(Format):
    name = "minicpm3"
    stop_strings = (CALL_END, IM_END)
    keep_stop = (CALL_END,)

    def render(self, calls: Sequence[ToolCall], thought: str | None = None,
               answer: str | None = None) -> str:
        out = f"{THOUGHT_START}\n{thought}\n{THOUGHT_END}\n" if thought is not None else ""
        if calls:
            lines = []
            for call in calls:
                _check_call(call)
                args = ", ".join(f"{k}={to_literal(v)}" for k, v in call.arguments.items())
                lines.append(f"{call.name}({args})")
            out += f"{CALL_START}\n```python\n" + "\n".join(lines) + f"\n```\n{CALL_END}"
        if answer is not None:
            out += ("\n" if calls else "") + answer
        return out

    def parse(self, text: str) -> Reply:
        reply = Reply(text=text)
        rest = text
        if THOUGHT_END in rest:
            before, rest = rest.split(THOUGHT_END, 1)
            reply.thought = before.split(THOUGHT_START, 1)[-1].strip()
        elif THOUGHT_START in rest and CALL_START not in rest:
            reply.thought = rest.split(THOUGHT_START, 1)[1].strip()
            reply.answer = ""
            return reply
        if CALL_START not in rest:
            reply.answer = rest.replace(THOUGHT_START, "").strip()
            return reply
        block = rest.split(CALL_START, 1)[1]
        if CALL_END not in block:
            reply.error = ToolCallParseError(f"the call block has no closing {CALL_END}")
            return reply
        try:
            reply.calls = _python_calls(block.split(CALL_END, 1)[0])
        except ToolCallParseError as exc:
            reply.error = exc
        return reply

    def describe_tools(self, tools: list[dict[str, Any]], extra_rules: str = "") -> str:
        stubs = "\n\n".join(_stub(t) for t in tools)
        return (
            "# Functions\nYou can call these Python functions:\n```python\n"
            "from typing import Any, Dict, List, Literal, Optional, Union\n\n"
            f"{stubs}\n```\n\n"
            "# How to reply\n"
            "- If you can answer without a function, write your thought and then the answer.\n"
            "- Otherwise write your thought and the calls, one per line, keyword arguments "
            "with literal values only; the results come back as tool messages.\n"
            f"{extra_rules}"
            f"- Format:\n{THOUGHT_START}\nyour reasoning\n{THOUGHT_END}\n{CALL_START}\n"
            f"```python\nfunction_name(argument=value)\n```\n{CALL_END}")

    def prompt(self, tokenizer: Any, system: str, query: str, turns: Sequence[Turn],
               note: str | None = None) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": query}]
        for turn in turns:
            messages.append({"role": "assistant", "content": turn.text})
            messages += [{"role": "tool", "content": observation_text(o)}
                         for o in turn.observations]
        if note:
            messages.append({"role": "user", "content": note})
        return chat_text(tokenizer, messages)


def _python_calls(body: str) -> list[ToolCall]:
    """Calls from a ```python block: ``name(key=literal, ...)`` statements only."""
    body = body.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
    if body.rstrip().endswith("```"):
        body = body.rstrip()[:-3]
    if not body.strip():
        raise ToolCallParseError("the call block is empty")
    if len(body) > _MAX_TEXT:
        raise ToolCallParseError(f"the call block has over {_MAX_TEXT} characters")
    try:
        tree = ast.parse(body)
    except SyntaxError as exc:
        raise ToolCallParseError(
            f"the call block is not valid Python: {exc.msg} (line {exc.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ToolCallParseError(f"the call block cannot be read: {exc}") from None
    calls = []
    for statement in tree.body:
        node = statement.value if isinstance(statement, ast.Expr) else None
        if not isinstance(node, ast.Call):
            raise ToolCallParseError(
                f"line {statement.lineno} is not a function call: "
                f"{ast.unparse(statement)[:60]!r}")
        if not isinstance(node.func, ast.Name):
            raise ToolCallParseError(
                f"line {statement.lineno}: call a function by its name, not "
                f"{ast.unparse(node.func)[:40]!r}")
        if node.args:
            raise ToolCallParseError(
                f"{node.func.id}: positional arguments are not allowed; write key=value")
        arguments = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise ToolCallParseError(f"{node.func.id}: '**' arguments are not allowed")
            arguments[kw.arg] = from_literal_node(kw.value)
        calls.append(ToolCall(node.func.id, arguments))
    return calls


_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.M)
_INPUT = re.compile(r"\s*Action[ \t]*Input[ \t]*:[ \t]*")
_FINAL = re.compile(r"^[ \t]*Final[ \t]*Answer[ \t]*:[ \t]*", re.M | re.I)
_THOUGHT = re.compile(r"^[ \t]*Thought[ \t]*:[ \t]*", re.M)
_NEXT_LINE_KEY = re.compile(r"^[ \t]*(Observation|Thought|Action|Final[ \t]*Answer)[ \t]*:",
                            re.M | re.I)


class ReActFormat(Format):
    name = "react"
    stop_strings = ("\nObservation:", "Observation:", IM_END)

    def render(self, calls: Sequence[ToolCall], thought: str | None = None,
               answer: str | None = None) -> str:
        lines = [f"Thought: {thought}"] if thought is not None else []
        for call in calls:
            _check_call(call)
            try:
                data = json.dumps(call.arguments, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ToolError(f"arguments of {call.name} are not JSON: {exc}") from None
            lines += [f"Action: {call.name}", f"Action Input: {data}"]
        if answer is not None:
            lines.append(f"Final Answer: {answer}")
        return "\n".join(lines)

    def parse(self, text: str) -> Reply:
        reply = Reply(text=text)
        actions = list(_ACTION.finditer(text))
        final = _FINAL.search(text)
        first = min([m.start() for m in actions] + ([final.start()] if final else [])
                    + [len(text)])
        head = text[:first]
        thought = _THOUGHT.search(head)
        reply.thought = (head[thought.end():] if thought else head).strip()
        if final and (not actions or final.start() < actions[0].start()):
            reply.answer = text[final.end():].strip()
            return reply
        if not actions:
            reply.error = ToolCallParseError(
                "the reply has neither 'Action:' with 'Action Input:' nor 'Final Answer:'")
            return reply
        try:
            reply.calls = [_react_call(text, m) for m in actions]
        except ToolCallParseError as exc:
            reply.error = exc
        return reply

    def describe_tools(self, tools: list[dict[str, Any]], extra_rules: str = "") -> str:
        described = []
        for tool in tools:
            function = tool.get("function", tool)
            described.append(f"- {function['name']}: {function.get('description', '')} "
                             f"Arguments (JSON schema): "
                             f"{json.dumps(function.get('parameters', {}), ensure_ascii=False)}")
        return (
            "You can use these tools:\n" + "\n".join(described) + "\n\n"
            "Answer in this format:\nThought: what to do next\nAction: a tool name\n"
            "Action Input: the arguments as a JSON object\nObservation: the result (given "
            "to you)\n... (Thought / Action / Action Input / Observation may repeat)\n"
            "Thought: I know the answer\nFinal Answer: the answer\n" + extra_rules)

    def prompt(self, tokenizer: Any, system: str, query: str, turns: Sequence[Turn],
               note: str | None = None) -> str:
        text = chat_text(tokenizer, [{"role": "system", "content": system},
                                     {"role": "user", "content": f"Question: {query}"}])
        for turn in turns:
            text += turn.text.rstrip() + "\n"
            text += "".join(f"Observation: {observation_text(o)}\n" for o in turn.observations)
        if note:
            text += f"Note: {note}\n"
        return text


def _react_call(text: str, action: re.Match) -> ToolCall:
    name = action.group(1).strip().strip("`")
    if not name.isidentifier():
        raise ToolCallParseError(f"'Action: {name[:40]}' does not name a tool")
    follow = _INPUT.match(text, action.end())
    if follow is None:
        raise ToolCallParseError(f"'Action: {name}' is not followed by 'Action Input:'")
    start = follow.end()
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        nxt = _NEXT_LINE_KEY.search(text, start)
        segment = text[start: nxt.start() if nxt else len(text)]
        try:
            value = parse_literal(segment)
        except ToolCallParseError:
            raise ToolCallParseError(
                f"Action Input of {name} is not a JSON object: {segment.strip()[:60]!r}") from None
    if not isinstance(value, dict):
        raise ToolCallParseError(f"Action Input of {name} must be a JSON object, got "
                                 f"{type(value).__name__}")
    return ToolCall(name, value)


class CompactFormat(MiniCPM3Format):
    """The MiniCPM3 call format with the tools described in one line each
    (``name(arg: type) - the description's first sentence``) and no reply instructions: what
    the small tool model is trained with (its replies and calls parse exactly as
    ``minicpm3``), so that most of a short transcript is the assistant's turns."""

    name = "compact"

    def describe_tools(self, tools: list[dict[str, Any]], extra_rules: str = "") -> str:
        lines = []
        for tool in tools:
            function = tool.get("function", tool)
            props = (function.get("parameters") or {}).get("properties", {})
            args = ", ".join(f"{n}: {_hint(s)}" for n, s in props.items())
            summary = function.get("description", "").strip().split(". ")[0].rstrip(".")
            lines.append(f"{function['name']}({args}) - {summary}")
        return "Tools:\n" + "\n".join(lines) + ("\n" + extra_rules.strip() if extra_rules
                                                 else "")


FORMATS: dict[str, Format] = {"minicpm3": MiniCPM3Format(), "react": ReActFormat(),
                              "compact": CompactFormat()}


def get_format(name: str | Format) -> Format:
    """The ``Format`` named ``name`` (``"minicpm3"``, ``"compact"`` or ``"react"``)."""
    if isinstance(name, Format):
        return name
    if name not in FORMATS:
        raise ConfigError(f"unknown tool-call format {name!r}; choose from {sorted(FORMATS)}")
    return FORMATS[name]


def render_tool_calls(calls: Sequence[ToolCall], format: str = "minicpm3", *,
                      thought: str | None = None) -> str:
    """The text of ``calls`` (and an optional thought) in ``format``;
    ``parse_tool_calls(render_tool_calls(calls, f), f) == calls``."""
    return get_format(format).render(calls, thought=thought)


def render_reply(format: str, *, thought: str | None = None,
                 calls: Sequence[ToolCall] = (), answer: str | None = None) -> str:
    """A whole reply (thought, calls and/or answer) in ``format``."""
    return get_format(format).render(calls, thought=thought, answer=answer)


def parse_reply(text: str, format: str = "minicpm3") -> Reply:
    """``text`` parsed as one reply in ``format``; a malformed call sets ``Reply.error``."""
    return get_format(format).parse(text)


def parse_tool_calls(text: str, format: str = "minicpm3") -> list[ToolCall]:
    """The calls in ``text`` (``[]`` when it makes none); raises ``ToolCallParseError`` naming
    what is wrong when it tries to call and the call is malformed."""
    fmt = get_format(format)
    reply = fmt.parse(text)
    tries = CALL_START in text if fmt.name == "minicpm3" else bool(_ACTION.search(text))
    if reply.error is not None and tries:
        raise reply.error
    return reply.calls
