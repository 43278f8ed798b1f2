"""The task suite of the wind tunnel: small generated tasks with exact checkers.

Every task is generated locally and deterministically from a seed (no downloaded data). An
instance is a prompt and the exact answer; a completion (the text the model generates after the
prompt) passes when its text up to the task's stop string, stripped of surrounding whitespace,
equals the answer character for character.

The tasks (difficulty grows within each task, so tiny models pass the easy instances now and
then and bigger ones pass more):

- ``arithmetic``: addition or subtraction of two numbers of 1 to 3 digits,
  ``"Q: 347+58="`` -> ``"405"`` (subtraction never goes below zero).
- ``kv_retrieval``: two to five ``key=value`` pairs (keys are short words, values three random
  lowercase letters or digits: two or three tokens under a byte-level BPE of 1-2K entries), then
  a query key, ``"kv: ant=q7v fig=m2x | fig="`` -> ``"m2x"``.
- ``python_expr``: a Python REPL line with a one-line expression whose ``repr`` is the answer,
  ``">>> len('abc')*2\\n"`` -> ``"6"``; the answer is computed by Python itself (``eval`` of
  the generated expression, built only from the templates below).

One more task is evaluation-only: it has no training split and is not part of ``TASKS`` (the
suite a family trains on), because its instances are cut from source files rather than
generated from a seed:

- ``code_recall``: a few lines of Python source, cut just before an identifier (4 to 16 characters,
  not a keyword, not ``self``) that already occurs in those lines; the answer is the
  identifier, ``"    def run(self, handler):\n        if handler"`` -> ``"handler"`` style.
  A completion passes when its leading identifier equals the answer. ``make_text_task(out_dir,
  files, n_test=, seed=)`` writes its ``test.jsonl`` from files the models never trained on
  (for the wind tunnel: standard-library files outside the family's corpus, listed in
  ``sources.json`` beside it). It measures in-context recall in code, which grows smoothly
  with held-out language-model loss.

``make_task_suite(out_dir, n_train=, n_test=, seed=)`` writes ``out_dir/<task>/test.jsonl``,
``train.jsonl`` and ``train.txt`` (training documents: several train instances per document,
documents separated by a blank line). Instances are split by prompt: no test prompt occurs in
the training split (``train.jsonl`` nor ``train.txt``).
"""

from __future__ import annotations

import json
import keyword
import os
import pathlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from cpmjax.errors import ConfigError, InputError, MissingPathError

__all__ = [
    "TASKS",
    "Instance",
    "Task",
    "EVAL_TASKS",
    "get_task",
    "load_instances",
    "make_task_suite",
    "make_text_task",
    "training_documents",
]


@dataclass(frozen=True)
class Instance:
    """One test case: the model sees ``prompt`` and must produce ``answer``."""

    id: str
    prompt: str
    answer: str


class Task:
    """A generated task with an exact checker.

    Subclasses give ``name``, ``max_new_tokens`` and ``_sample(rng) -> (prompt, answer)``;
    ``stop`` is the string that ends an answer (a newline for every task here).
    """

    name: str = ""
    stop: str = "\n"
    max_new_tokens: int = 8

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def check(self, instance: Instance, completion: str) -> bool:
        """Whether ``completion`` (the generated text after the prompt) answers ``instance``:
        the text up to the first ``stop``, stripped, equals the answer exactly."""
        return completion.split(self.stop, 1)[0].strip() == instance.answer

    def generate(self, n: int, seed: int) -> list[Instance]:
        """``n`` instances with distinct prompts, the same for the same ``(n, seed)``; the
        first ``k`` of ``generate(n, seed)`` are ``generate(k, seed)``."""
        if n < 0:
            raise InputError(f"{self.name}: number of instances must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{seed}")
        seen: set[str] = set()
        out: list[Instance] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ConfigError(
                    f"task {self.name!r} cannot produce {n} distinct instances "
                    f"(found {len(out)} after {attempts - 1} draws)")
            prompt, answer = self._sample(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            out.append(Instance(id=f"{self.name}-{seed}-{len(out)}", prompt=prompt,
                                answer=answer))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _number(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


class ArithmeticTask(Task):
    """``Q: a+b=`` / ``Q: a-b=`` with operands of 1 to 3 digits (each drawn separately)."""

    name = "arithmetic"
    max_new_tokens = 6

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        a = _number(rng, rng.randint(1, 3))
        b = _number(rng, rng.randint(1, 3))
        if rng.random() < 0.5:
            return f"Q: {a}+{b}=", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"Q: {a}-{b}=", str(a - b)


_KEYS = ("ant", "bee", "cat", "dog", "eel", "fig", "fox", "gnu", "hen", "ink", "jam", "kit",
         "lamp", "map", "net", "owl", "pen", "rat", "sun", "tea", "urn", "van", "web", "yak",
         "zip", "box", "cup", "egg", "hat", "key")
_VALUE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


class KVRetrievalTask(Task):
    """``kv: k1=v1 k2=v2 ... | kq=`` -> ``vq`` with 2 to 5 pairs and 3-character values."""

    name = "kv_retrieval"
    max_new_tokens = 6

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        n_pairs = rng.randint(2, 5)
        keys = rng.sample(_KEYS, n_pairs)
        values = ["".join(rng.choice(_VALUE_CHARS) for _ in range(3)) for _ in keys]
        query = rng.randrange(n_pairs)
        pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        return f"kv: {pairs} | {keys[query]}=", values[query]


_WORDS = ("a", "ab", "abc", "cat", "dog", "sun", "tree", "jax", "code", "list", "word", "data",
          "moon", "star", "fish", "blue", "red", "tea", "map", "key", "box", "cup", "pen",
          "ink", "owl", "fox", "hat", "egg", "sky", "sea", "rain", "snow", "leaf", "rock",
          "bird", "lamp", "door", "ship", "gold", "wind")


def _expression(rng: random.Random) -> str:
    """One expression from a fixed set of templates, easy ones (a literal sum) to harder ones
    (a comprehension, slicing with a step)."""
    w = rng.choice(_WORDS)
    w2 = rng.choice(_WORDS)
    a, b, c = rng.randint(0, 19), rng.randint(1, 9), rng.randint(0, 19)
    templates: list[Callable[[], str]] = [
        lambda: f"{a}+{b}",
        lambda: f"{a}*{b}",
        lambda: f"len('{w}')",
        lambda: f"len('{w}')*{b}",
        lambda: f"'{w}'.upper()",
        lambda: f"'{w}'[::-1]",
        lambda: f"'{w}'+'{w2}'",
        lambda: f"'{w}'*{min(b, 3)}",
        lambda: f"max({a}, {b}, {c})",
        lambda: f"min({a}, {b}, {c})",
        lambda: f"{a + 5 * c}//{b}",
        lambda: f"{a + 5 * c}%{b}",
        lambda: f"'{w}'.count('{w2[0]}')",
        lambda: f"'{w}'.find('{w2[0]}')",
        lambda: f"len('{w}'+'{w2}')",
        lambda: f"'{w}' in '{w2}{w}'",
        lambda: f"[x*{b} for x in range({min(a, 4)})]",
        lambda: f"[x+{b} for x in [{a}, {c}]]",
        lambda: f"'{w}'[:{min(b, 4)}]",
        lambda: f"sorted([{a}, {b}, {c}])",
        lambda: f"'{w}'[{min(b, len(w)) - 1}]",
        lambda: f"{a}+{b}*{c}",
    ]
    return rng.choice(templates)()


class PythonExprTask(Task):
    """``>>> EXPR\\n`` -> ``repr(EXPR)``, evaluated by Python (the REPL's echo)."""

    name = "python_expr"
    max_new_tokens = 16

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        expression = _expression(rng)
        value = eval(expression, {"__builtins__": {}}, {  # noqa: S307 - our own templates
            "len": len, "max": max, "min": min, "range": range, "sorted": sorted})
        return f">>> {expression}\n", repr(value)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CodeRecallTask(Task):
    """Python source cut before an identifier that already occurs in the prompt; the answer
    is that identifier. Evaluation only: instances come from :meth:`from_sources`."""

    name = "code_recall"
    max_new_tokens = 14
    context_chars = 150  # whole lines before the cut, at most this many characters
    min_length, max_length = 4, 16  # answer characters
    skip = frozenset(keyword.kwlist) | {"self", "None", "True", "False"}

    def check(self, instance: Instance, completion: str) -> bool:
        """The completion's leading identifier (nothing before it) equals the answer."""
        match = _IDENTIFIER.match(completion)
        return match is not None and match.group(0) == instance.answer

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        raise ConfigError("code_recall is cut from source files: use make_text_task")

    def _candidates(self, text: str) -> list[tuple[str, str]]:
        lines = text.splitlines(keepends=True)
        out = []
        for i, line in enumerate(lines):
            if i == 0:
                continue
            # whole previous lines, newest first, within the context budget
            start, used = i, 0
            while start > 0 and used + len(lines[start - 1]) <= self.context_chars:
                start -= 1
                used += len(lines[start])
            if start == i:
                continue
            context = "".join(lines[start:i])
            for match in _IDENTIFIER.finditer(line):
                word = match.group(0)
                if match.start() > 0 and (line[match.start() - 1].isalnum()
                                          or line[match.start() - 1] in "_'\"\\"):
                    continue
                if not self.min_length <= len(word) <= self.max_length or word in self.skip:
                    continue
                prefix = context + line[:match.start()]
                if re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", prefix):
                    out.append((prefix, word))
        return out

    def from_sources(self, sources: list[tuple[str, str]], n: int, seed: int,
                     per_source: int = 2) -> list[Instance]:
        """``n`` instances with distinct prompts from ``sources`` (``(key, text)`` pairs), at
        most ``per_source`` from one source, visited in a seeded order; ids name the source."""
        if n < 1:
            raise InputError(f"{self.name}: number of instances must be >= 1, got {n}")
        rng = random.Random(f"{self.name}:{seed}")
        order = list(sources)
        rng.shuffle(order)
        seen: set[str] = set()
        out: list[Instance] = []
        for key, text in order:
            candidates = self._candidates(text)
            rng.shuffle(candidates)
            taken = 0
            for prompt, answer in candidates:
                if taken == per_source or len(out) == n:
                    break
                if prompt in seen:
                    continue
                seen.add(prompt)
                out.append(Instance(id=f"{self.name}-{seed}-{len(out)}:{key}", prompt=prompt,
                                    answer=answer))
                taken += 1
            if len(out) == n:
                return out
        raise InputError(f"{self.name}: {len(sources)} source files give only {len(out)} "
                         f"instances, {n} wanted")


TASKS: dict[str, Task] = {
    task.name: task for task in (ArithmeticTask(), KVRetrievalTask(), PythonExprTask())
}
EVAL_TASKS: dict[str, Task] = {task.name: task for task in (CodeRecallTask(),)}


def get_task(name: str) -> Task:
    """The task called ``name`` (a training task or an evaluation-only one); a
    ``ConfigError`` listing the known ones otherwise."""
    task = TASKS.get(name) or EVAL_TASKS.get(name)
    if task is None:
        known = ", ".join(sorted({*TASKS, *EVAL_TASKS}))
        raise ConfigError(f"unknown task {name!r}; known tasks: {known}")
    return task


def make_text_task(out_dir: str | os.PathLike, files: Iterable[tuple[str, str]], *,
                   n_test: int, seed: int = 0, name: str = "code_recall") -> dict[str, Any]:
    """Write the evaluation-only task ``name`` under ``out_dir/<name>/``: ``test.jsonl``
    (``n_test`` instances cut from ``files``, ``(key, path)`` pairs of text the models never
    trained on) and ``sources.json`` (the keys used). Returns the summary written there."""
    task = EVAL_TASKS.get(name)
    if task is None or not isinstance(task, CodeRecallTask):
        raise ConfigError(f"{name!r} is not a text task; text tasks: {', '.join(EVAL_TASKS)}")
    sources = []
    for key, path in files:
        try:
            sources.append((key, pathlib.Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read source text for {name} ({exc})") from exc
    if not sources:
        raise InputError(f"{name}: no source files given")
    instances = task.from_sources(sources, n_test, seed)
    directory = pathlib.Path(out_dir) / name
    directory.mkdir(parents=True, exist_ok=True)
    _write_jsonl(directory / "test.jsonl", instances)
    used = sorted({x.id.split(":", 1)[1] for x in instances})
    summary = {"task": name, "test": len(instances), "seed": seed, "sources": used,
               "candidate_files": len(sources)}
    tmp = directory / "sources.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, directory / "sources.json")
    return summary


def training_documents(instances: Iterable[Instance], task: Task, *, seed: int,
                       per_document: tuple[int, int] = (4, 8)) -> list[str]:
    """Training text for ``instances``: each document holds a few of them, each written as
    ``prompt + answer + stop`` (the text a passing completion would produce)."""
    rng = random.Random(f"{task.name}:documents:{seed}")
    items = list(instances)
    documents = []
    i = 0
    while i < len(items):
        k = rng.randint(*per_document)
        documents.append("".join(f"{x.prompt}{x.answer}{task.stop}" for x in items[i:i + k]))
        i += k
    return documents


def _write_jsonl(path: pathlib.Path, instances: list[Instance]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for x in instances:
            f.write(json.dumps(asdict(x)) + "\n")
    os.replace(tmp, path)


def make_task_suite(out_dir: str | os.PathLike, *, n_train: int, n_test: int, seed: int = 0,
                    tasks: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Write every task's split under ``out_dir/<task>/``: ``test.jsonl`` (the first ``n_test``
    generated instances), ``train.jsonl`` (the next ``n_train``: distinct prompts, so disjoint
    from the test split by construction) and ``train.txt`` (training documents from the train
    split). Returns ``{task: {"train": n_train, "test": n_test, "train_chars": ...}}``."""
    if n_train < 0 or n_test < 1:
        raise InputError(f"need n_train >= 0 and n_test >= 1, got n_train={n_train}, "
                         f"n_test={n_test}")
    names = list(tasks) if tasks is not None else sorted(TASKS)
    out = pathlib.Path(out_dir)
    summary: dict[str, dict[str, int]] = {}
    for name in names:
        task = get_task(name)
        instances = task.generate(n_test + n_train, seed)
        test, train = instances[:n_test], instances[n_test:]
        test_prompts = {x.prompt for x in test}
        assert not any(x.prompt in test_prompts for x in train)  # distinct by construction
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        _write_jsonl(directory / "test.jsonl", test)
        _write_jsonl(directory / "train.jsonl", train)
        text = "\n".join(training_documents(train, task, seed=seed))
        (directory / "train.txt").write_text(text)
        summary[name] = {"train": len(train), "test": len(test), "train_chars": len(text)}
    return summary


def load_instances(path: str | os.PathLike, split: str = "test") -> list[Instance]:
    """Instances from a ``.jsonl`` file, or from ``<path>/<split>.jsonl`` when ``path`` is a
    task directory written by :func:`make_task_suite`."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / f"{split}.jsonl"
    if not p.is_file():
        raise MissingPathError(f"no instance file at {p}")
    instances = []
    with open(p) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                instances.append(Instance(id=str(row["id"]), prompt=row["prompt"],
                                          answer=row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{p}:{line_number}: not an instance record ({exc})") from exc
    return instances
