"""Synthetic tool-use transcripts: tasks (multi-digit arithmetic, lookups in a key-value store,
unit conversions, lookup-then-compute, questions answered directly), the replies an expert
would write, and their rendering through the very prompt builder the agents use
(``Format.prompt`` + the tokenizer's chat template), with the character spans of the
assistant turns the loss should count.

Everything is generated from a seed (``random.Random``): the same seed gives the same tasks and
the same text. Tool results are not written by hand: every call of a transcript is run through
a real ``ToolRegistry`` (``calculator`` and a ``lookup`` bound to the task's store), so the
observations are exactly what the runtime returns.

Transcript variants (``Transcript.variant``):

- ``"react"``: the system prompt of ``cpmjax.tools.react`` (the tools described);
- ``"dfsdt"``: the system prompt of ``cpmjax.tools.dfsdt`` (the tools plus
  ``give_up_and_restart``), sometimes with the diversity note of a re-expanded node, and
  sometimes a failed attempt that ends with ``give_up_and_restart()``;
- ``"direct"``: no tools in the prompt, the answer written at once (what the without-tools
  condition and the without-tool-data baseline see).

A deliberately wrong call (a wrong key, a malformed expression, an unknown tool name) is part
of the context of the turn that recovers from it; its own turn is not trained (``trained`` is
False), so the model learns the recovery, not the mistake."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Any

from cpmjax.errors import ConfigError
from cpmjax.tools.agents import Step, system_prompt
from cpmjax.tools.builtins import calculator_tool, key_value_tool
from cpmjax.tools.calls import Observation, ToolCall
from cpmjax.tools.dfsdt import _GIVE_UP_TOOL, _RULE, GIVE_UP, diversity_note
from cpmjax.tools.formats import IM_END, Turn, chat_text, get_format, render_reply
from cpmjax.tools.registry import ToolRegistry

__all__ = [
    "DIRECT_SYSTEM",
    "KINDS",
    "Reply",
    "Task",
    "Transcript",
    "answer_is_correct",
    "expert_first_call",
    "make_task",
    "make_tasks",
    "make_transcript",
    "make_transcripts",
    "task_registry",
]

DIRECT_SYSTEM = "You are a helpful assistant. Answer directly."
KINDS = ("arithmetic", "lookup", "convert", "lookup_arith", "direct")

_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "zu", "bel", "quin", "dor", "sa", "fen",
              "ni", "gor", "pa", "lis", "mo", "tek", "ul", "vash", "ri", "nox", "cal", "ye")
_ATTRIBUTES = ("phone", "code", "city", "age", "price", "room")
_CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Delhi", "Perth", "Accra",
           "Hanoi", "Bern", "Riga")
# (from, to, factor, the sentence of the thought): value_to = value_from * factor
_UNITS = (("km", "m", 1000, "1 km is 1000 m"), ("m", "cm", 100, "1 m is 100 cm"),
          ("kg", "g", 1000, "1 kg is 1000 g"), ("hours", "minutes", 60, "1 hour is 60 minutes"),
          ("minutes", "seconds", 60, "1 minute is 60 seconds"),
          ("days", "hours", 24, "1 day is 24 hours"), ("weeks", "days", 7, "1 week is 7 days"),
          ("feet", "inches", 12, "1 foot is 12 inches"), ("yards", "feet", 3, "1 yard is 3 feet"),
          ("pounds", "ounces", 16, "1 pound is 16 ounces"),
          ("liters", "milliliters", 1000, "1 liter is 1000 milliliters"),
          ("miles", "feet", 5280, "1 mile is 5280 feet"))
_GREETINGS = (("Hello!", "Hello! Ask me about numbers, units or stored values."),
              ("Hi, who are you?", "I am an assistant that can use a calculator and a lookup "
                                   "tool."),
              ("What can you do?", "I can compute with a calculator and look up stored values."),
              ("Thanks!", "You are welcome."),
              ("Which tools do you have?", "I have a calculator and a lookup tool."))


@dataclasses.dataclass(frozen=True)
class Task:
    """One question, its expected answer (``answer``: the exact value the reply must state) and
    the key-value store its ``lookup`` tool reads."""

    kind: str
    question: str
    answer: str
    store: tuple[tuple[str, str], ...] = ()
    data: tuple[tuple[str, Any], ...] = ()  # what the expert needs (operands, keys, units)

    def get(self, name: str) -> Any:
        return dict(self.data)[name]


@dataclasses.dataclass
class Reply:
    """One assistant turn of a transcript: the text written, its calls, what they returned,
    whether the loss counts it, and the diversity ``note`` (DFSDT) shown just before it."""

    text: str
    calls: list[ToolCall]
    observations: list[Observation]
    trained: bool = True
    note: str | None = None


@dataclasses.dataclass
class Transcript:
    """A rendered conversation: ``text`` and the ``[start, end)`` character spans of the
    trained assistant turns (each turn's text and the ``<|im_end|>`` that closes it)."""

    task: Task
    variant: str
    replies: list[Reply]
    text: str
    spans: list[tuple[int, int]]
    untrained_spans: list[tuple[int, int]]


# -- tasks ----------------------------------------------------------------------------------

def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _value(rng: random.Random, attribute: str) -> str:
    if attribute == "phone":
        return f"{rng.randint(200, 999)}-{rng.randint(1000, 9999)}"
    if attribute == "code":
        return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + \
            f"-{rng.randint(100, 9999)}"
    if attribute == "city":
        return rng.choice(_CITIES)
    if attribute == "age":
        return str(rng.randint(18, 95))
    if attribute == "price":
        return str(rng.randint(2, 99))
    return str(rng.randint(100, 999))  # room


def _store(rng: random.Random, entity: str, must: str) -> dict[str, str]:
    """The entity's attributes (``must`` among them) and one or two other entities'."""
    store = {}
    names = [entity] + [_name(rng) for _ in range(rng.randint(1, 2))]
    for name in names:
        attributes = set(rng.sample(_ATTRIBUTES, rng.randint(2, 3)))
        if name == entity:
            attributes.add(must)
        for attribute in sorted(attributes):
            store[f"{name}.{attribute}"] = _value(rng, attribute)
    return store


def _number(rng: random.Random, low_digits: int, high_digits: int) -> int:
    digits = rng.randint(low_digits, high_digits)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def make_task(rng: random.Random, kind: str) -> Task:
    """One task of ``kind`` (see ``KINDS``) drawn from ``rng``."""
    if kind == "arithmetic":
        op = rng.choice(("+", "-", "*", "*", "3op"))
        if op == "3op":
            a, b, c = _number(rng, 2, 3), _number(rng, 2, 3), _number(rng, 1, 2)
            expression = f"({a} + {b}) * {c}"
            value = (a + b) * c
        else:
            a, b = _number(rng, 2, 4), _number(rng, 2, 4)
            expression = f"{a} {op} {b}"
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = rng.choice(("What is {e}?", "Compute {e}.", "Calculate {e}."))
        return Task(kind, question.format(e=expression), str(value),
                    data=(("expression", expression),))
    if kind == "convert":
        src, dst, factor, fact = rng.choice(_UNITS)
        amount = _number(rng, 1, 3)
        if rng.random() < 0.3:  # the other way: divide (an exact multiple)
            value = amount * factor
            question = f"Convert {value} {dst} to {src}."
            expression, result = f"{value} / {factor}", f"{value / factor}"
        else:
            question = rng.choice(("Convert {a} {s} to {d}.", "How many {d} are {a} {s}?"))
            question = question.format(a=amount, s=src, d=dst)
            expression, result = f"{amount} * {factor}", str(amount * factor)
        return Task(kind, question, result, data=(("expression", expression), ("fact", fact)))
    if kind in ("lookup", "lookup_arith"):
        entity = _name(rng)
        attribute = "price" if kind == "lookup_arith" else rng.choice(_ATTRIBUTES)
        store = _store(rng, entity, attribute)
        key = f"{entity}.{attribute}"
        if kind == "lookup":
            question = f"What is the {attribute} of {entity}?"
            return Task(kind, question, store[key], tuple(sorted(store.items())),
                        data=(("key", key),))
        count = rng.randint(2, 30)
        question = f"How much do {count} items of {entity} cost? Use the price of {entity}."
        price = int(store[key])
        return Task(kind, question, str(price * count), tuple(sorted(store.items())),
                    data=(("key", key), ("count", count)))
    if kind == "repeat":
        # curriculum: copy an expression or a key from the question into the answer
        if rng.random() < 0.5:
            a, b = _number(rng, 1, 4), _number(rng, 1, 4)
            text = f"{a} {rng.choice('+-*')} {b}"
        else:
            text = f"{_name(rng)}.{rng.choice(_ATTRIBUTES)}"
        return Task(kind, f"Repeat: {text}", text)
    if kind == "direct":
        if rng.random() < 0.5:
            question, answer = rng.choice(_GREETINGS)
            return Task(kind, question, answer)
        a, b = rng.randint(1, 9), rng.randint(0, 9)
        return Task(kind, f"What is {a} + {b}?", str(a + b), data=(("expression", f"{a} + {b}"),))
    raise ConfigError(f"unknown task kind {kind!r}; choose from {KINDS + ('repeat',)}")


def make_tasks(seed: int, count: int, kinds: Sequence[str] = KINDS,
               exclude: set[str] | None = None) -> list[Task]:
    """``count`` tasks cycling through ``kinds``; a question in ``exclude`` is drawn again
    (held-out sets: ``exclude`` = the training questions)."""
    rng = random.Random(seed)
    tasks = []
    exclude = exclude or set()
    while len(tasks) < count:
        task = make_task(rng, kinds[len(tasks) % len(kinds)])
        if task.question in exclude and task.kind != "direct":
            continue
        tasks.append(task)
    return tasks


def task_registry(task: Task) -> ToolRegistry:
    """The tools a task is solved with: ``calculator`` and ``lookup`` over the task's store."""
    return ToolRegistry([calculator_tool(), key_value_tool(dict(task.store))])


# -- answers --------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_is_correct(task: Task, answer: str | None) -> bool:
    """Whether ``answer`` states the task's answer: the last number in it equals the expected
    number (relative error 1e-9) for numeric answers; the expected text appears in it
    otherwise."""
    if answer is None:
        return False
    if _NUMBER.fullmatch(task.answer):
        found = _NUMBER.findall(answer)
        if not found:
            return False
        want, got = float(task.answer), float(found[-1])
        return abs(got - want) <= 1e-9 * max(1.0, abs(want))
    return task.answer in answer


def _final_text(task: Task) -> str:
    if task.kind == "arithmetic":
        return f"{task.get('expression')} = {task.answer}"
    if task.kind == "convert":
        return f"The answer is {task.answer}."
    if task.kind == "lookup":
        key = task.get("key")
        entity, attribute = key.split(".")
        return f"The {attribute} of {entity} is {task.answer}."
    if task.kind == "lookup_arith":
        return f"They cost {task.answer}."
    if task.kind == "repeat":
        return task.answer
    return task.answer if not task.data else f"{task.get('expression')} = {task.answer}"


# -- the expert's replies -------------------------------------------------------------------

def _mistake(rng: random.Random, task: Task) -> tuple[ToolCall, str, str] | None:
    """A plausible wrong first call for ``task``: (the call, its thought, the thought of the
    turn that recovers from it), or None."""
    if task.kind in ("lookup", "lookup_arith"):
        key = task.get("key")
        entity, attribute = key.split(".")
        wrong = rng.choice((f"{entity} {attribute}", f"{entity}_{attribute}", entity,
                            f"{attribute}.{entity}"))
        return (ToolCall("lookup", {"key": wrong}), f"I look up the {attribute} of {entity}.",
                f"That key does not exist. The key is {key}.")
    if task.kind in ("arithmetic", "convert"):
        expression = task.get("expression")
        if rng.random() < 0.5:
            return (ToolCall("calc", {"expression": expression}), "I use the calculator.",
                    "There is no tool calc. The tool is calculator.")
        return (ToolCall("calculator", {"expression": expression.replace("*", "x")
                                        .replace("+", "plus")}),
                "I use the calculator.", "The expression must use + - * / only.")
    return None


def _plan(task: Task) -> list[tuple[str, ToolCall | None]]:
    """The expert's steps: (thought, call) pairs; the last has no call (the answer)."""
    if task.kind == "arithmetic":
        return [("I use the calculator.", ToolCall("calculator",
                                                  {"expression": task.get("expression")})),
                ("I have the result.", None)]
    if task.kind == "convert":
        return [(f"{task.get('fact')}. I use the calculator.",
                 ToolCall("calculator", {"expression": task.get("expression")})),
                ("I have the result.", None)]
    if task.kind == "lookup":
        entity, attribute = task.get("key").split(".")
        return [(f"I look up the {attribute} of {entity}.",
                 ToolCall("lookup", {"key": task.get("key")})),
                ("I have the value.", None)]
    if task.kind == "lookup_arith":
        entity = task.get("key").split(".")[0]
        price = dict(task.store)[task.get("key")]
        return [(f"I look up the price of {entity}.", ToolCall("lookup", {"key": task.get("key")})),
                (f"The price is {price}. I multiply it by {task.get('count')}.",
                 ToolCall("calculator", {"expression": f"{price} * {task.get('count')}"})),
                ("I have the result.", None)]
    return [("No tool is needed.", None)]


def expert_first_call(task: Task) -> ToolCall | None:
    """The call the expert makes first for ``task`` (None: it answers without a tool)."""
    return _plan(task)[0][1]


def _reply(fmt: Any, registry: ToolRegistry, thought: str, call: ToolCall | None,
           answer: str | None = None, trained: bool = True) -> Reply:
    calls = [call] if call is not None else []
    text = render_reply(fmt.name, thought=thought, calls=calls,
                        answer=answer if call is None else None)
    observations = [registry.execute(c) for c in calls]
    return Reply(text, calls, observations, trained)


def make_transcript(task: Task, rng: random.Random, variant: str, tokenizer: Any = None, *,
                    format: str = "minicpm3", mistake_rate: float = 0.25,
                    give_up_rate: float = 0.25, note_rate: float = 0.5) -> Transcript:
    """The expert's transcript of ``task`` in ``variant`` (``"react"``, ``"dfsdt"`` or
    ``"direct"``) rendered for ``tokenizer`` (its chat template; None: ChatML markers)."""
    if variant not in ("react", "dfsdt", "direct"):
        raise ConfigError(f"unknown transcript variant {variant!r}")
    fmt = get_format(format)
    if variant == "direct":
        prompt = chat_text(tokenizer, [{"role": "system", "content": DIRECT_SYSTEM},
                                       {"role": "user", "content": task.question}])
        reply = render_reply(fmt.name, answer=_final_text(task))
        return Transcript(task, variant, [Reply(reply, [], [])], prompt + reply + IM_END,
                          [(len(prompt), len(prompt) + len(reply) + len(IM_END))], [])
    registry = task_registry(task)
    if variant == "react":
        system = system_prompt(fmt, registry)
    else:
        system = system_prompt(fmt, registry, extra_tools=[_GIVE_UP_TOOL], extra_rules=_RULE)
    replies: list[Reply] = []
    plan = _plan(task)
    mistake = _mistake(rng, task) if rng.random() < mistake_rate else None
    note = None
    if mistake is not None:
        call, thought, recovery = mistake
        wrong = _reply(fmt, registry, thought, call, trained=False)
        if wrong.observations[0].ok:  # not a mistake after all (never for these tasks)
            mistake = None
        elif variant == "dfsdt" and rng.random() < give_up_rate:
            # the failed branch: the model gives up; this transcript ends there
            replies = [wrong, _reply(fmt, registry, "This attempt cannot work.",
                                     ToolCall(GIVE_UP, {}))]
            replies[-1].observations = []
            return _render(task, variant, fmt, tokenizer, system, replies)
        elif variant == "dfsdt" and rng.random() < note_rate:
            # the root expanded again after that branch gave up: the note lists it
            earlier = Step(0, "give_up", wrong.text, calls=[c.to_dict() for c in wrong.calls])
            note = diversity_note([earlier])
        else:
            replies.append(wrong)
            plan[0] = (recovery, plan[0][1])
    for thought, call in plan:
        answer = _final_text(task) if call is None else None
        replies.append(_reply(fmt, registry, thought, call, answer))
        if note is not None:
            # the note is shown only at the re-expanded node: the next prompt (its child)
            # drops it, so the transcript is that one reply
            replies[-1].note = note
            break
    return _render(task, variant, fmt, tokenizer, system, replies)


def _render(task: Task, variant: str, fmt: Any, tokenizer: Any, system: str,
            replies: list[Reply]) -> Transcript:
    """Each reply appended to the prompt the agent would build for it (``Format.prompt``
    over the earlier turns); checks that each prompt extends the previous text."""
    turns: list[Turn] = []
    text, spans, untrained = "", [], []
    for reply in replies:
        prompt = fmt.prompt(tokenizer, system, task.question, turns, reply.note)
        if not prompt.startswith(text):
            raise ConfigError("the chat template does not extend earlier turns; cannot "
                              "render a transcript whose turns share one text")
        start = len(prompt)
        text = prompt + reply.text + IM_END
        (spans if reply.trained else untrained).append((start, len(text)))
        turns.append(Turn(reply.text, reply.observations))
    return Transcript(task, variant, replies, text, spans, untrained)


def make_transcripts(seed: int, count: int, tokenizer: Any = None, *,
                     variants: dict[str, float] | None = None,
                     kinds: dict[str, float] | None = None,
                     format: str = "minicpm3") -> list[Transcript]:
    """``count`` transcripts: each draws a kind (weights ``kinds``) and a variant (weights
    ``variants``; ``direct`` only for kinds a model could answer without tools: arithmetic,
    convert, direct; always for ``repeat``, the copying curriculum outside ``KINDS``).
    Deterministic in ``seed``."""
    variants = variants or {"react": 0.6, "dfsdt": 0.3, "direct": 0.1}
    kinds = kinds or {"arithmetic": 0.3, "lookup": 0.2, "convert": 0.2, "lookup_arith": 0.2,
                      "direct": 0.1}
    rng = random.Random(seed)
    out = []
    kind_names, kind_weights = list(kinds), list(kinds.values())
    variant_names, variant_weights = list(variants), list(variants.values())
    while len(out) < count:
        kind = rng.choices(kind_names, kind_weights)[0]
        variant = rng.choices(variant_names, variant_weights)[0]
        if variant == "direct" and kind in ("lookup", "lookup_arith"):
            continue
        if kind == "repeat":  # a curriculum turn: no tools
            variant = "direct"
        task = make_task(rng, kind)
        out.append(make_transcript(task, rng, variant, tokenizer, format=format))
    return out
