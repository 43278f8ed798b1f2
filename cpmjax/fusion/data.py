"""Instruction/response data of the three UltraFuser domains, built only from what is on the
machine (no downloads):

- ``text``: English prose: sections of the Python language reference
  (``pydoc_data/topics.py`` of the running Python) and the descriptions in the installed
  packages' ``METADATA`` files. Instruction: the title and opening of a passage; response: how
  it continues.
- ``code``: Python sources: functions of the standard library (``ast``). Instruction: the
  signature and docstring; response: the body.
- ``math``: generated arithmetic and algebra word problems (``math_problem``) with a worked
  answer ending in ``The answer is N.`` (an exact integer, checked by ``math_answer``).

Every example is ``"Instruction: ...\\n" + RESPONSE_MARKER + "\\n" + response``; the marker
(``"###"``, one token of the bundled tokenizer) occurs once, so ``data.loss_after="###"`` puts
the loss on the response only. ``write_domain_files`` writes one example per file (one
document each for ``cpmjax train``'s data sources) plus a JSONL of held-out examples.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import random
import re
import site
import sysconfig
from collections.abc import Iterator
from typing import Any

from cpmjax.errors import ConfigError

__all__ = [
    "DOMAINS",
    "RESPONSE_MARKER",
    "code_examples",
    "format_example",
    "math_answer",
    "math_examples",
    "math_problem",
    "text_examples",
    "write_domain_files",
]

RESPONSE_MARKER = "###"
DOMAINS = ("text", "code", "math")

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Juno", "Kofi",
          "Lena", "Mika", "Nora", "Omar", "Pia"]
_ITEMS = ["apples", "books", "marbles", "stamps", "coins", "pencils", "cards", "shells"]


def format_example(instruction: str, response: str) -> str:
    """One document: the instruction, the response marker on its own line, the response. A
    marker inside the instruction or response is broken up (``"##"``), so it occurs once."""
    instruction = instruction.replace(RESPONSE_MARKER, "##").strip()
    response = response.replace(RESPONSE_MARKER, "##").strip("\n").rstrip()
    return f"Instruction: {instruction}\n{RESPONSE_MARKER}\n{response}"


def split_example(document: str) -> tuple[str, str]:
    """``(prompt, response)``: the prompt ends with the marker line (what a model is given)."""
    head, _, tail = document.partition(f"\n{RESPONSE_MARKER}\n")
    return head + f"\n{RESPONSE_MARKER}\n", tail


# ----------------------------------------------------------------------------------------------
# math
def math_problem(rng: random.Random) -> tuple[str, str, int]:
    """``(question, worked answer, exact answer)`` of one random problem: a two-step word
    problem (add, take away, share, multiply) or a linear equation ``a*x + b = c``."""
    kind = rng.randrange(5)
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b
    if kind == 1:
        a = rng.randint(20, 120)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return q, f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b
    if kind == 2:
        n, k = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} has {n} boxes with {k} {item} in each box. How many {item} are there?"
        return q, f"{n} * {k} = {n * k}. The answer is {n * k}.", n * k
    if kind == 3:
        k, per = rng.randint(2, 9), rng.randint(2, 15)
        total = k * per
        q = f"{name} shares {total} {item} equally among {k} friends. How many does each get?"
        return q, f"{total} / {k} = {per}. The answer is {per}.", per
    a, x, b = rng.randint(2, 9), rng.randint(-12, 12), rng.randint(-30, 30)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    q = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    worked = (f"{a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}. "
              f"x = {c - b} / {a} = {x}. The answer is {x}.")
    return q, worked, x


_ANSWER = re.compile(r"The answer is (-?\d+)")


def math_answer(response: str) -> int | None:
    """The exact final answer of a worked math response (``None`` when it states none)."""
    match = _ANSWER.search(response)
    return int(match.group(1)) if match else None


def math_examples(count: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(count):
        question, worked, answer = math_problem(rng)
        yield {"domain": "math", "key": f"math/{seed}/{i}",
               "text": format_example(question, worked), "answer": answer}


# ----------------------------------------------------------------------------------------------
# text
def _passages(text: str, size: int) -> Iterator[str]:
    """Paragraph-aligned chunks of about ``size`` characters of prose."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunk = ""
    for p in paragraphs:
        if len(p) < 40 or p.startswith(("   ", "::", "..", "|", "+", "-", "=", "*")):
            continue  # grammar rules, code, tables, headings: not prose
        chunk = f"{chunk}\n\n{p}" if chunk else p
        if len(chunk) >= size:
            yield chunk[: size * 2]
            chunk = ""


def _metadata_description(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    _, _, body = raw.partition("\n\n")  # the headers end at the first blank line
    return body


def text_examples(size: int = 360) -> Iterator[dict[str, Any]]:
    """Prose passages: the first third is the instruction's opening, the rest the response."""
    import pydoc_data.topics as topics

    sources: list[tuple[str, str]] = [(f"reference/{k}", v)
                                      for k, v in sorted(topics.topics.items())]
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    for root in roots:
        for meta in sorted(glob.glob(os.path.join(root, "*.dist-info", "METADATA"))):
            name = os.path.basename(os.path.dirname(meta)).split("-")[0]
            sources.append((f"metadata/{name}", _metadata_description(meta)))
    for key, text in sources:
        for j, passage in enumerate(_passages(text, size)):
            cut = passage.rfind(" ", 0, len(passage) // 3)
            if cut <= 0:
                continue
            title = key.split("/", 1)[1]
            instruction = (f"Continue this passage about {title}.\n"
                           f"{passage[:cut].strip()}")
            yield {"domain": "text", "key": f"{key}/{j}",
                   "text": format_example(instruction, passage[cut:].strip())}


# ----------------------------------------------------------------------------------------------
# code
def code_examples(max_body_lines: int = 14) -> Iterator[dict[str, Any]]:
    """Standard-library functions with a docstring and a short body: the instruction is the
    signature and docstring, the response the body."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
            "pydoc_data", "encodings"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            lines = source.splitlines()
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(node.body) < 2:
                    continue
                body_start = node.body[1].lineno - 1
                body_end = node.end_lineno
                if body_end - body_start > max_body_lines or body_end - body_start < 2:
                    continue
                indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
                signature = lines[node.lineno - 1][indent:]
                body = "\n".join(x[indent:] if len(x) >= indent else x.strip()
                                 for x in lines[body_start:body_end])
                first_doc = doc.strip().splitlines()[0]
                instruction = (f"Write the body of this Python function from {module}.\n"
                               f"{signature}\n    \"\"\"{first_doc}\"\"\"")
                yield {"domain": "code", "key": f"{module}.{node.name}/{node.lineno}",
                       "text": format_example(instruction, body)}


# ----------------------------------------------------------------------------------------------
def _held_out(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def write_domain_files(out_dir: str, *, per_domain: int = 3000, heldout: int = 64,
                       seed: int = 0, heldout_fraction: float = 0.05) -> dict[str, Any]:
    """Write ``out_dir/<domain>/train/NNNNN.txt`` (one example each, at most ``per_domain``) and
    ``out_dir/<domain>/heldout.jsonl`` (``heldout`` examples chosen by a hash of their key, or
    for math a separate seed), plus ``out_dir/summary.json``. Returns the summary."""
    if per_domain < 1 or heldout < 1:
        raise ConfigError(f"per_domain and heldout must be >= 1, got {per_domain}, {heldout}")
    sources = {
        "text": lambda: text_examples(),
        "code": lambda: code_examples(),
        "math": lambda: math_examples(per_domain, seed),
    }
    summary: dict[str, Any] = {"marker": RESPONSE_MARKER, "domains": {}}
    for domain, make in sources.items():
        train_dir = os.path.join(out_dir, domain, "train")
        os.makedirs(train_dir, exist_ok=True)
        examples = list(make())
        rng = random.Random(seed)
        rng.shuffle(examples)
        if domain == "math":
            train = examples
            held = list(math_examples(heldout, seed + 1_000_003))
            seen = {e["text"] for e in train}
            held = [e for e in held if e["text"] not in seen]
        else:
            held = [e for e in examples if _held_out(e["key"], heldout_fraction)][:heldout]
            held_keys = {e["key"] for e in held}
            train = [e for e in examples if e["key"] not in held_keys]
        train = train[:per_domain]
        if not train or not held:
            raise ConfigError(f"domain {domain!r} produced no examples (train {len(train)}, "
                              f"held out {len(held)})")
        for i, example in enumerate(train):
            with open(os.path.join(train_dir, f"{i:05d}.txt"), "w") as f:
                f.write(example["text"])
        with open(os.path.join(out_dir, domain, "heldout.jsonl"), "w") as f:
            for example in held:
                f.write(json.dumps(example) + "\n")
        summary["domains"][domain] = {"train": len(train), "heldout": len(held),
                                      "train_dir": train_dir}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
