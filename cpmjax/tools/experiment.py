"""The tool-learning experiment (``scripts/bench_tools.py``, ``docs/benchmarks/tools.md``):
held-out tasks, one model run on each under a condition, the scores, and the sandbox's cost.

Conditions (``run_task``):

- ``"react"``: ``cpmjax.tools.react`` with the task's tools (``calculator``, ``lookup``),
  greedy, at most ``budget`` model calls;
- ``"dfsdt"``: ``cpmjax.tools.dfsdt``, the same tools, ``max_model_calls=budget``, sampling;
- ``"direct"``: no tools in the prompt (the ``synth.DIRECT_SYSTEM`` system message and the
  question), one reply read as the answer.

A call the model emits *parses and validates* when its reply parses in the format and the
call names a tool of the registry (or DFSDT's ``give_up_and_restart``) with arguments that
pass the tool's JSON schema (``ToolRegistry.validate``); an unparseable call block counts as
one call that does not."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

from cpmjax.errors import ConfigError
from cpmjax.tools.agents import AgentResult, react
from cpmjax.tools.dfsdt import GIVE_UP, dfsdt
from cpmjax.tools.formats import IM_END, chat_text, parse_reply
from cpmjax.tools.policy import ModelPolicy
from cpmjax.tools.registry import ToolRegistry
from cpmjax.tools.sandbox import Sandbox
from cpmjax.tools.synth import (
    DIRECT_SYSTEM,
    Task,
    answer_is_correct,
    expert_first_call,
    make_tasks,
    make_transcripts,
    task_registry,
)

__all__ = ["CONDITIONS", "TaskRecord", "call_validity", "held_out_tasks", "run_experiment",
           "run_task", "sandbox_overhead", "summarize", "training_questions"]

CONDITIONS = ("react", "dfsdt", "direct")
_INVALID = ("unparseable", "unknown_tool", "invalid_arguments")


@dataclasses.dataclass
class TaskRecord:
    """One task under one condition: correct or not, and what the run cost."""

    kind: str
    question: str
    expected: str
    condition: str
    answer: str | None
    correct: bool
    stopped: str
    model_calls: int
    calls: int  # calls the model emitted (an unparseable call block counts as one)
    valid_calls: int  # of those, how many parsed and validated
    new_tokens: int
    seconds: float
    trace: dict[str, Any] | None = None
    first_call: dict[str, Any] | None = None  # the first call the model made
    right_tool: bool | None = None  # it names the tool the expert calls first
    exact_call: bool | None = None  # name and arguments equal the expert's first call

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_questions(training: Sequence[dict[str, Any]]) -> set[str]:
    """The questions of the training sets ``training`` (each the ``seed``, ``transcripts``,
    ``variants`` and ``kinds`` of one ``make_transcripts`` call a model was trained on, as
    ``train_tool_model`` records them in ``<out_dir>/data_phases.json``)."""
    seen: set[str] = set()
    for phase in training:
        seen.update(t.task.question for t in make_transcripts(
            phase["seed"], phase["transcripts"], variants=phase.get("variants"),
            kinds=phase.get("kinds")))
    return seen


def held_out_tasks(per_kind: dict[str, int], *, seed: int,
                   exclude: set[str] | None = None) -> list[Task]:
    """``per_kind[kind]`` tasks of each kind drawn with ``seed``, none of whose questions is in
    ``exclude`` (the training questions, ``training_questions``)."""
    tasks = []
    for index, (kind, count) in enumerate(sorted(per_kind.items())):
        tasks += make_tasks(seed * 1000 + index, count, (kind,), exclude=exclude or set())
    return tasks


def call_validity(result: AgentResult, registry: ToolRegistry) -> tuple[int, int]:
    """``(calls emitted, calls that parsed and validated)`` over an agent's steps."""
    total = valid = 0
    for step in result.steps:
        if step.kind == "unparseable":
            total += 1
        elif step.kind == "give_up":
            total += len(step.calls)
            valid += sum(1 for c in step.calls if c["name"] == GIVE_UP and not c["arguments"])
        elif step.kind == "calls":
            total += len(step.observations)
            valid += sum(1 for o in step.observations if o.error not in _INVALID)
    return total, valid


def run_task(model: Any, tokenizer: Any, task: Task, condition: str, *, budget: int = 4,
             beam: int = 2, dfsdt_depth: int = 4, temperature: float = 0.7,
             max_new_tokens: int = 64, seed: int = 0, keep_trace: bool = False,
             format: str = "minicpm3") -> TaskRecord:
    """Run ``model`` on ``task`` under ``condition`` (see the module docstring); ``format``:
    the call format (and tool description) the agents prompt with, the model's training
    format."""
    registry = task_registry(task)
    if condition == "direct":
        policy = ModelPolicy(model, tokenizer, max_new_tokens=max_new_tokens,
                             stop_strings=(IM_END,))
        prompt = chat_text(tokenizer, [{"role": "system", "content": DIRECT_SYSTEM},
                                       {"role": "user", "content": task.question}])
        completion = policy(prompt)
        reply = parse_reply(completion.text, format)
        answer = reply.answer if reply.answer is not None else completion.text
        return TaskRecord(task.kind, task.question, task.answer, condition, answer,
                          answer_is_correct(task, answer), "answer", 1, 0, 0,
                          completion.new_tokens, completion.seconds)
    if condition == "react":
        result = react(model, tokenizer, task.question, registry, max_steps=budget,
                       max_new_tokens=max_new_tokens, seed=seed, format=format)
    elif condition == "dfsdt":
        result = dfsdt(model, tokenizer, task.question, registry, max_model_calls=budget,
                       beam=beam, max_steps=dfsdt_depth, temperature=temperature,
                       max_new_tokens=max_new_tokens, seed=seed, format=format)
    else:
        raise ConfigError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    calls, valid = call_validity(result, registry)
    trace = result.trace
    first = next((c for s in result.steps for c in s.calls), None)
    expert = expert_first_call(task)
    right = exact = None
    if expert is not None:
        right = first is not None and first["name"] == expert.name
        exact = right and first["arguments"] == expert.arguments
    return TaskRecord(task.kind, task.question, task.answer, condition, result.answer,
                      answer_is_correct(task, result.answer), result.stopped,
                      result.model_calls, calls, valid, trace["new_tokens"], result.seconds,
                      trace if keep_trace else None, first, right, exact)


def summarize(records: Sequence[TaskRecord]) -> list[dict[str, Any]]:
    """Per (model condition, kind) and per condition over all kinds: tasks, success rate,
    calls emitted, parse-and-validate rate, mean model calls and seconds per task."""
    groups: dict[tuple[str, str], list[TaskRecord]] = {}
    for record in records:
        groups.setdefault((record.condition, record.kind), []).append(record)
        groups.setdefault((record.condition, "all"), []).append(record)
    rows = []
    for (condition, kind), items in sorted(groups.items()):
        calls = sum(r.calls for r in items)
        judged = [r for r in items if r.right_tool is not None]
        rows.append({"condition": condition, "kind": kind, "tasks": len(items),
                     "success": sum(r.correct for r in items) / len(items),
                     "right_tool": (sum(r.right_tool for r in judged) / len(judged)) if judged
                     else None,
                     "exact_call": (sum(r.exact_call for r in judged) / len(judged)) if judged
                     else None,
                     "calls": calls,
                     "valid_rate": (sum(r.valid_calls for r in items) / calls) if calls
                     else None,
                     "model_calls": statistics.mean(r.model_calls for r in items),
                     "seconds": statistics.mean(r.seconds for r in items)})
    return rows


def _add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def sandbox_overhead(repeats: int = 20, sandbox: Sandbox | None = None) -> dict[str, float]:
    """Median seconds of one call of a trivial tool (``a + b``): in process
    (``registry.execute`` of an in-process tool) and out of process (``Sandbox.call`` and
    ``registry.execute`` of the same tool registered ``sandboxed=True``), interleaved, over
    ``repeats`` rounds; the sandboxed call must return the same value."""
    box = sandbox or Sandbox()
    local = ToolRegistry()
    local.register(_add, name="add")
    remote = ToolRegistry(sandbox=box)
    remote.register(_add, name="add", sandboxed=True)
    from cpmjax.tools.calls import ToolCall

    call = ToolCall("add", {"a": 20, "b": 22})
    times: dict[str, list[float]] = {"in_process": [], "sandbox_call": [],
                                     "registry_sandboxed": []}
    for _ in range(repeats):
        start = time.perf_counter()
        local_obs = local.execute(call)
        times["in_process"].append(time.perf_counter() - start)
        start = time.perf_counter()
        result = box.call(_add, call.arguments)
        times["sandbox_call"].append(time.perf_counter() - start)
        start = time.perf_counter()
        remote_obs = remote.execute(call)
        times["registry_sandboxed"].append(time.perf_counter() - start)
        if not result.ok or result.value != 42 or remote_obs.content != local_obs.content:
            raise ConfigError(f"the sandboxed add returned {result.value!r} / "
                              f"{remote_obs.content!r}, expected 42")
    return {key: statistics.median(values) for key, values in times.items()}


def run_experiment(models: dict[str, tuple[Any, Any]], tasks: Sequence[Task],
                   plan: Sequence[tuple[str, str, Sequence[str]]], *, path: str | None = None,
                   budget: int = 4, seed: int = 0, progress: bool = True,
                   **kwargs: Any) -> list[TaskRecord]:
    """Run every task of the kinds listed in ``plan`` (``(model label, condition, kinds)``)
    under that model and condition; records are labelled ``"<model>/<condition>"``. With
    ``path`` each record is appended to that JSON-lines file as it is made, and records
    already there are kept (not rerun): an interrupted run resumes."""
    import json
    import os

    from tqdm import tqdm

    done: dict[tuple[str, str], TaskRecord] = {}
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = TaskRecord(**json.loads(line))
                    done[(record.condition, record.question)] = record
    jobs = [(label, condition, task) for label, condition, kinds in plan for task in tasks
            if task.kind in kinds]
    records = []
    bar = tqdm(jobs, disable=not progress, desc="tasks")
    for label, condition, task in bar:
        key = (f"{label}/{condition}", task.question)
        if key in done:
            records.append(done[key])
            continue
        if label not in models:
            raise ConfigError(f"the plan names model {label!r}; have {sorted(models)}")
        model, tokenizer = models[label]
        record = run_task(model, tokenizer, task, condition, budget=budget, seed=seed,
                          **kwargs)
        record.condition = key[0]
        records.append(record)
        if path is not None:
            with open(path, "a") as f:
                f.write(json.dumps(record.to_dict()) + "\n")
    return records
