"""``cpmjax chat``: talk to a model that can call tools.

    cpmjax chat [--model DIR|NAME] [--tools calculator,lookup,python] [--search react|dfsdt]
                [--format minicpm3|react] [--prompt TEXT] [--max-steps N]
                [--max-model-calls N] [--beam N] [--max-new-tokens N] [--temperature T]
                [--seed S] [--kv FILE.json] [--timeout S] [--trace FILE.json]

Without ``--prompt`` it reads questions from stdin until EOF (or ``exit``). The model's text
streams to stdout; each call and its observation is shown as ``[call] ...`` / ``[result] ...``
lines on stderr, with the answer and why the agent stopped. The default model is the bundled
tool model ``cpmjax-tools`` (trained here on synthetic calculator / lookup transcripts, see
docs/tools.md); ``--model cpmjax-tiny`` is the general bundled model, never trained to call
tools."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.tools.agents import Step, react
from cpmjax.tools.builtins import BUILTINS, calculator_tool, key_value_tool, python_tool
from cpmjax.tools.dfsdt import dfsdt
from cpmjax.tools.formats import FORMATS, observation_text
from cpmjax.tools.registry import ToolRegistry
from cpmjax.tools.sandbox import Sandbox
from cpmjax.tools.training import TOOL_MODEL_NAME, tool_model_dir


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="answer questions with tools (ReAct or DFSDT)")
    p.add_argument("--model", default=None,
                   help="local HF checkpoint dir, or a bundled model's name (cpmjax-tools, "
                        "cpmjax-tiny); default: the bundled tool model cpmjax-tools")
    p.add_argument("--tools", default="calculator,lookup",
                   help=f"comma-separated tools from {', '.join(BUILTINS)} (or 'none')")
    p.add_argument("--search", default="react", choices=["react", "dfsdt"])
    p.add_argument("--format", default=None, choices=sorted(FORMATS),
                   help="default: the format the model was trained with (its "
                        "tool_format.json), else minicpm3")
    p.add_argument("--prompt", default=None, help="one question (default: read stdin)")
    p.add_argument("--max-steps", type=int, default=4, help="model calls per path")
    p.add_argument("--max-model-calls", type=int, default=8, help="dfsdt: the budget")
    p.add_argument("--beam", type=int, default=2, help="dfsdt: children per node")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None,
                   help="default: 0 for react, 0.7 for dfsdt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv", default=None, help="JSON object file for the lookup tool")
    p.add_argument("--timeout", type=float, default=5.0, help="python tool: seconds per run")
    p.add_argument("--trace", default=None, help="write the JSON trace(s) to this file")
    p.set_defaults(func=_run_chat)


def build_registry(names: str, *, kv_path: str | None = None,
                   timeout_s: float = 5.0) -> ToolRegistry:
    """A registry of the named built-in tools (``"calculator,python,lookup"``)."""
    wanted = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    unknown = sorted(set(wanted) - set(BUILTINS))
    if unknown:
        raise ConfigError(f"--tools: unknown tool(s) {unknown}; choose from {list(BUILTINS)}")
    registry = ToolRegistry()
    for name in wanted:
        if name == "calculator":
            registry.add(calculator_tool())
        elif name == "python":
            registry.add(python_tool(Sandbox(timeout_s=timeout_s)))
        elif name == "lookup":
            registry.add(key_value_tool(_load_store(kv_path)))
    return registry


def _load_store(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MissingPathError(f"--kv file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"--kv file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--kv file {path} must hold a JSON object")
    return data


def model_path(model: str | None) -> str:
    """The directory ``cpmjax chat`` loads: ``model`` (a directory, or the name of a bundled
    model), by default the bundled tool model ``cpmjax-tools`` (``cpmjax-tiny`` if it is
    absent)."""
    import cpmjax
    from cpmjax.train import bundled_model_dir

    if model is None:
        path = tool_model_dir()
        return path if os.path.isfile(os.path.join(path, "config.json")) else \
            cpmjax.default_model_path()
    if not os.path.isdir(model) and model in (TOOL_MODEL_NAME, cpmjax.DEFAULT_MODEL_NAME):
        return bundled_model_dir(model)
    if not os.path.isdir(model):
        raise MissingPathError(f"--model {model} is neither a directory nor a bundled model "
                               f"({TOOL_MODEL_NAME}, {cpmjax.DEFAULT_MODEL_NAME})")
    return model


def _show_step(step: Step) -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()
    for call in step.calls:
        args = json.dumps(call["arguments"], ensure_ascii=False)
        print(f"[call] {call['name']} {args}", file=sys.stderr)
    for observation in step.observations:
        text = observation_text(observation)
        print(f"[result] {text[:500]}{'...' if len(text) > 500 else ''}", file=sys.stderr)
    if step.kind == "give_up":
        print("[give up] backtracking", file=sys.stderr)


def _run_chat(args: Any) -> int:
    import cpmjax

    path = model_path(args.model)
    registry = build_registry(args.tools, kv_path=args.kv, timeout_s=args.timeout)
    model = cpmjax.from_pretrained(path)
    tokenizer = cpmjax.load_tokenizer(path)

    def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    from cpmjax.tools.training import tool_format

    common = {"format": args.format or tool_format(path), "max_steps": args.max_steps,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "on_step": _show_step, "on_text": on_text}
    traces = []
    questions = [args.prompt] if args.prompt is not None else _stdin_questions()
    for question in questions:
        if args.search == "react":
            result = react(model, tokenizer, question, registry,
                           temperature=args.temperature or 0.0, **common)
        else:
            result = dfsdt(model, tokenizer, question, registry,
                           max_model_calls=args.max_model_calls, beam=args.beam,
                           temperature=0.7 if args.temperature is None else args.temperature,
                           **common)
        print(f"[answer] {result.answer!r} (stopped: {result.stopped}; "
              f"{result.model_calls} model calls, {result.seconds:.1f} s)", file=sys.stderr)
        traces.append(result.trace)
    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as f:
            json.dump(traces if len(traces) != 1 else traces[0], f, ensure_ascii=False,
                      indent=1)
    return 0


def _stdin_questions():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()
