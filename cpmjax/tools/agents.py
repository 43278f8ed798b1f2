"""The ReAct agent and what every agent shares: one step (prompt -> policy -> parsed reply ->
tool results), the system prompt, the JSON trace and the result.

A bad call (unparseable, unknown tool, arguments failing the schema, the tool failing, timing
out, printing too much) becomes an ``Observation`` the model reads at its next step; nothing a
call does escapes the loop. A policy that cannot answer at all (the prompt outgrew the model's
context, a typed ``cpmjax`` error) ends the run with ``stopped="policy_error"``."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from cpmjax.errors import ConfigError, CpmjaxError
from cpmjax.tools.calls import Observation, Reply
from cpmjax.tools.formats import Format, Turn, get_format
from cpmjax.tools.policy import ModelPolicy, Policy, as_completion
from cpmjax.tools.registry import ToolRegistry

__all__ = ["AgentResult", "Step", "model_policy", "react", "run_step", "system_prompt"]

DEFAULT_SYSTEM = "You are a helpful assistant that uses tools to answer exactly."


@dataclasses.dataclass
class Step:
    """One model call of an agent and what came of it. ``kind``: ``"answer"``, ``"calls"``,
    ``"unparseable"``, ``"give_up"`` (DFSDT) or ``"policy_error"``."""

    index: int
    kind: str
    text: str
    thought: str = ""
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    observations: list[Observation] = dataclasses.field(default_factory=list)
    answer: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    node: int | None = None
    parent: int | None = None
    depth: int = 0
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["observations"] = [o.to_dict() for o in self.observations]
        out["seconds"] = round(self.seconds, 6)
        return out


@dataclasses.dataclass
class AgentResult:
    """An agent's answer (None when it found none), why it stopped (``"answer"``,
    ``"max_steps"``, ``"budget"``, ``"exhausted"``, ``"policy_error"``) and its trace."""

    answer: str | None
    stopped: str
    steps: list[Step]
    search: str
    format: str
    query: str
    seconds: float

    @property
    def model_calls(self) -> int:
        return len(self.steps)

    @property
    def trace(self) -> dict[str, Any]:
        """Every step as JSON-serialisable data (``json.dumps(result.trace)`` works)."""
        return {"search": self.search, "format": self.format, "query": self.query,
                "answer": self.answer, "stopped": self.stopped,
                "model_calls": self.model_calls,
                "prompt_tokens": sum(s.prompt_tokens for s in self.steps),
                "new_tokens": sum(s.new_tokens for s in self.steps),
                "seconds": round(self.seconds, 6),
                "steps": [s.to_dict() for s in self.steps]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.trace, ensure_ascii=False, **kwargs)


def system_prompt(fmt: Format, registry: ToolRegistry, system: str | None = None,
                  extra_tools: Sequence[dict[str, Any]] = (), extra_rules: str = "") -> str:
    """The system message: ``system`` (or a default) and the tools described in ``fmt``."""
    tools = registry.schemas() + list(extra_tools)
    return (system or DEFAULT_SYSTEM) + "\n\n" + fmt.describe_tools(tools, extra_rules)


def run_step(policy: Policy, fmt: Format, registry: ToolRegistry, prompt: str, index: int, *,
             give_up: str | None = None) -> tuple[Step, Reply | None]:
    """Ask ``policy`` for one reply to ``prompt``, parse it, run its calls. Never raises for
    anything the model wrote: a malformed call is an ``unparseable`` observation, a failing
    call an observation with its error; a ``CpmjaxError`` of the policy is ``policy_error``."""
    start = time.perf_counter()
    try:
        raw = policy(prompt)
    except CpmjaxError as exc:
        return Step(index, "policy_error", f"{type(exc).__name__}: {exc}",
                    seconds=time.perf_counter() - start), None
    completion = as_completion(raw, time.perf_counter() - start)
    reply = fmt.parse(completion.text)
    step = Step(index, "calls", completion.text, thought=reply.thought,
                calls=[c.to_dict() for c in reply.calls],
                prompt_tokens=completion.prompt_tokens, new_tokens=completion.new_tokens)
    if reply.error is not None:
        step.kind = "unparseable"
        step.observations = [Observation("", str(reply.error), "unparseable")]
    elif give_up is not None and any(c.name == give_up for c in reply.calls):
        step.kind = "give_up"
    elif reply.calls:
        step.observations = [registry.execute(c) for c in reply.calls]
    else:
        step.kind, step.answer = "answer", reply.answer or ""
    step.seconds = time.perf_counter() - start
    return step, reply


def record_step(step: Step, steps: list[Step], on_step: Callable[[Step], None] | None
                ) -> str | None:
    """Append ``step`` to the trace and report it; returns why the search ends there
    (``"answer"`` or ``"policy_error"``) or None to go on. Shared by ReAct and DFSDT."""
    steps.append(step)
    if on_step is not None:
        on_step(step)
    return step.kind if step.kind in ("answer", "policy_error") else None


def model_policy(model: Any, tokenizer: Any, fmt: Format, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 on_text: Callable[[str], None] | None = None) -> ModelPolicy:
    """A ``ModelPolicy`` that stops where ``fmt``'s replies end."""
    return ModelPolicy(model, tokenizer, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed,
                       stop_strings=fmt.stop_strings, keep_stop=fmt.keep_stop,
                       on_text=on_text)


def react(model: Any, tokenizer: Any, query: str, registry: ToolRegistry, *,
          max_steps: int = 6, format: str = "minicpm3", system: str | None = None,
          policy: Policy | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
          top_p: float = 1.0, seed: int = 0,
          on_step: Callable[[Step], None] | None = None,
          on_text: Callable[[str], None] | None = None) -> AgentResult:
    """ReAct: reply, run the calls, show the results, repeat, until an answer or
    ``max_steps`` model calls. ``policy`` replaces the model (``model`` may then be None;
    ``tokenizer`` still renders the prompt through its chat template when given)."""
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    fmt = get_format(format)
    if policy is None:
        policy = model_policy(model, tokenizer, fmt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed,
                              on_text=on_text)
    system_text = system_prompt(fmt, registry, system)
    start = time.perf_counter()
    turns: list[Turn] = []
    steps: list[Step] = []
    answer, stopped = None, "max_steps"
    for index in range(max_steps):
        prompt = fmt.prompt(tokenizer, system_text, query, turns)
        step, _ = run_step(policy, fmt, registry, prompt, index)
        step.node, step.parent, step.depth = index + 1, index, index + 1
        ended = record_step(step, steps, on_step)
        if ended is not None:
            answer, stopped = step.answer, ended
            break
        turns.append(Turn(step.text, step.observations))
    return AgentResult(answer, stopped, steps, "react", fmt.name, query,
                       time.perf_counter() - start)
