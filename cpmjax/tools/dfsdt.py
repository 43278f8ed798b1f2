"""DFSDT: depth-first search over a decision tree of agent steps, under a budget of model
calls.

Each node is one reply (with its tool results); its path from the root is the conversation the
model sees. The search expands the deepest open node first. When a node is expanded again, the
prompt lists the children it already has, so the model tries something different. A reply that
calls ``give_up_and_restart`` closes its branch: the search backtracks to the parent, which
tries another child (at most ``beam`` children per node; then it backtracks further). A node at
``max_steps`` depth without an answer is a dead end. The search ends at the first answer, when
``max_model_calls`` replies have been asked for (``"budget"``), or when every branch is closed
(``"exhausted"``)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from cpmjax.errors import ConfigError
from cpmjax.tools.agents import (
    AgentResult,
    Step,
    model_policy,
    record_step,
    run_step,
    system_prompt,
)
from cpmjax.tools.formats import Turn, get_format
from cpmjax.tools.policy import Policy
from cpmjax.tools.registry import ToolRegistry

__all__ = ["GIVE_UP", "dfsdt", "diversity_note"]

GIVE_UP = "give_up_and_restart"
_GIVE_UP_TOOL = {"type": "function", "function": {
    "name": GIVE_UP,
    "description": "Abandon this attempt when it cannot lead to the answer; you will go back "
                   "one step and try something different.",
    "parameters": {"type": "object", "properties": {}}}}
_RULE = f"- If this attempt cannot work, call {GIVE_UP}() to go back and try another way.\n"


@dataclasses.dataclass
class _Node:
    id: int
    parent: int | None
    depth: int
    step: Step | None = None
    children: list[int] = dataclasses.field(default_factory=list)


def _summary(step: Step) -> str:
    if step.kind == "give_up":
        action, outcome = f"{GIVE_UP}()", "gave up"
    elif step.calls:
        action = "; ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})"
                           for c in step.calls)
        outcome = "led to a dead end"
    else:
        action, outcome = repr(step.text.strip()[:120]), "could not be used"
    return f"{action} -> {outcome}"


def diversity_note(earlier: list[Step]) -> str:
    """The note shown when a node is expanded again: its earlier children, to avoid."""
    lines = [f"{i}. {_summary(s)}" for i, s in enumerate(earlier, 1)]
    return ("You have been at this point before, and these attempts from here failed:\n"
            + "\n".join(lines) + "\nDo something different from all of them.")


def dfsdt(model: Any, tokenizer: Any, query: str, registry: ToolRegistry, *,
          max_model_calls: int = 12, beam: int = 2, max_steps: int = 6,
          format: str = "minicpm3", system: str | None = None, policy: Policy | None = None,
          max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.95,
          seed: int = 0, on_step: Callable[[Step], None] | None = None,
          on_text: Callable[[str], None] | None = None) -> AgentResult:
    """Depth-first search over a decision tree (see the module docstring). ``beam``: children
    per node; ``max_steps``: the depth of a path; ``max_model_calls``: the budget. Sampling
    (``temperature`` > 0, a new seed per call) lets re-expansions differ. Every step is in the
    trace with its ``node``, ``parent``, ``depth`` and the diversity ``note`` it was shown."""
    for key, value in (("max_model_calls", max_model_calls), ("beam", beam),
                       ("max_steps", max_steps)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"dfsdt {key} must be a positive int, got {value!r}")
    if GIVE_UP in registry:
        raise ConfigError(f"the tool name {GIVE_UP!r} is reserved by dfsdt")
    fmt = get_format(format)
    if policy is None:
        policy = model_policy(model, tokenizer, fmt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed,
                              on_text=on_text)
    system_text = system_prompt(fmt, registry, system, extra_tools=[_GIVE_UP_TOOL],
                                extra_rules=_RULE)
    start = time.perf_counter()
    nodes = [_Node(0, None, 0)]
    stack = [0]
    steps: list[Step] = []
    answer, stopped = None, "exhausted"
    while stack:
        node = nodes[stack[-1]]
        if len(node.children) >= beam or node.depth >= max_steps:
            stack.pop()  # every child tried, or a dead end: backtrack
            continue
        if len(steps) >= max_model_calls:
            stopped = "budget"
            break
        turns, at = [], node
        while at.step is not None:
            turns.append(Turn(at.step.text, at.step.observations))
            at = nodes[at.parent]
        turns.reverse()
        earlier = [nodes[c].step for c in node.children]
        note = diversity_note(earlier) if earlier else None
        prompt = fmt.prompt(tokenizer, system_text, query, turns, note)
        step, _ = run_step(policy, fmt, registry, prompt, len(steps), give_up=GIVE_UP)
        child = _Node(len(nodes), node.id, node.depth + 1, step)
        step.node, step.parent, step.depth, step.note = child.id, node.id, child.depth, note
        nodes.append(child)
        node.children.append(child.id)
        ended = record_step(step, steps, on_step)
        if ended is not None:
            answer, stopped = step.answer, ended
            break
        if step.kind != "give_up":
            stack.append(child.id)
    return AgentResult(answer, stopped, steps, "dfsdt", fmt.name, query,
                       time.perf_counter() - start)
