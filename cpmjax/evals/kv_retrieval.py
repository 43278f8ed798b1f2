"""Synthetic long-context key-value retrieval data for ``cpmjax train`` and the APB quality study.

The generator behind ``scripts/make_kv_retrieval.py`` (which writes a corpus with it) and
``scripts/apb_quality.py`` (which evaluates on it).

A document is a list of ``key value...`` pairs followed by questions ``? key`` whose answer is the
value of that key::

    <s> k17 v3 v41 k902 v0 v9 ... k230 v12 v5 ? k902 v0 v9 ? k17 v3 v41 ... </s>

- keys are single tokens ``k0 .. k{num_keys-1}``, all distinct within a document;
- a value is ``value_len`` tokens from ``v0 .. v{num_values-1}`` (chance of a right guess:
  ``num_values ** -value_len``);
- a training document has ``num_queries`` questions about pairs drawn uniformly at random, and
  exactly ``seq_len`` tokens (``<s>`` and ``</s>`` included; ``.`` tokens fill the rest), so that
  ``cpmjax train``'s packer cuts one document per row;
- an evaluation prompt ends with one question (``? key``), so the query is the last two tokens,
  which APB embeds in its anchor; the answer is the value that follows.

The tokenizer is word level (``tokenizers.models.WordLevel`` on whitespace): the special tokens
``<unk> <s> </s> <pad>`` (ids 0-3, the MiniCPM ids), then ``? .``, the keys, the values. It is
saved as an HF tokenizer directory that ``cpmjax.load_tokenizer`` loads offline.

- with ``--query-first F`` a fraction ``F`` of the training documents state their first question
  before the context (``<s> ? k902 k17 v3 ...``), as long-context prompts often do: APB embeds the
  query in its anchor, right after ``<s>``, so every host's context sees it there.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

__all__ = [
    "FILLER",
    "QUESTION",
    "SPECIALS",
    "KVExample",
    "KVSpec",
    "context_ids",
    "eval_example",
    "make_tokenizer",
    "sample_pairs",
    "straddling_pairs",
    "training_document",
    "write_corpus",
]

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
QUESTION, FILLER = "?", "."


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """Shape of the task: vocabulary sizes and the value length (tokens)."""

    num_keys: int = 128
    num_values: int = 32
    value_len: int = 2

    @property
    def vocab(self) -> list[str]:
        """Every token in id order."""
        return (list(SPECIALS) + [QUESTION, FILLER] + [f"k{i}" for i in range(self.num_keys)]
                + [f"v{i}" for i in range(self.num_values)])

    @property
    def pair_len(self) -> int:
        return 1 + self.value_len

    def key_id(self, key: int) -> int:
        return len(SPECIALS) + 2 + key

    def value_id(self, value: int) -> int:
        return len(SPECIALS) + 2 + self.num_keys + value


@dataclasses.dataclass
class KVExample:
    """One evaluation prompt: ``ids [seq]`` ending in ``? key``; ``answer [value_len]``;
    ``needle``: input position of the queried key in the context."""

    ids: np.ndarray
    answer: np.ndarray
    needle: int


def sample_pairs(rng: np.random.Generator, spec: KVSpec, num_pairs: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``keys [num_pairs]`` (distinct) and ``values [num_pairs, value_len]`` (indices)."""
    if num_pairs > spec.num_keys:
        raise ValueError(f"num_pairs={num_pairs} exceeds num_keys={spec.num_keys}")
    keys = rng.choice(spec.num_keys, size=num_pairs, replace=False)
    values = rng.integers(0, spec.num_values, size=(num_pairs, spec.value_len))
    return keys, values


def context_ids(spec: KVSpec, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[1 + num_pairs * pair_len]``: ``<s>`` then the pairs, as token ids."""
    rows = np.concatenate([np.vectorize(spec.key_id)(keys)[:, None],
                           np.vectorize(spec.value_id)(values).reshape(len(keys), -1)], axis=1)
    return np.concatenate([[1], rows.reshape(-1)]).astype(np.int32)


def training_document(rng: np.random.Generator, spec: KVSpec, seq_len: int,
                      num_queries: int | None = None, min_pairs: int | None = None,
                      max_pairs: int | None = None, query_first: bool = False) -> str:
    """One training document of exactly ``seq_len`` tokens (``<s>``/``</s>`` included) as
    whitespace-separated words (``<s>``/``</s>`` are added by the packer, not written).

    With ``num_queries``: as many pairs as fit before that many questions. Otherwise the number
    of pairs is drawn uniformly from ``[min_pairs, max_pairs]`` and questions fill the rest
    (keys drawn with replacement when there are more questions than pairs): short contexts with
    many questions give a dense retrieval signal, long ones the long-context case.

    ``query_first``: the document opens with its first question's ``? key`` (2 tokens) before
    the pairs."""
    body = seq_len - 2 - (2 if query_first else 0)
    q_len = 2 + spec.value_len
    if num_queries is not None:
        num_pairs = (body - num_queries * q_len) // spec.pair_len
    else:
        if min_pairs is None or max_pairs is None or not 1 <= min_pairs <= max_pairs:
            raise ValueError("give num_queries, or 1 <= min_pairs <= max_pairs")
        num_pairs = int(rng.integers(min_pairs, max_pairs + 1))
        num_queries = (body - num_pairs * spec.pair_len) // q_len
    if num_pairs < 1 or num_queries < 1:
        raise ValueError(f"seq_len={seq_len} does not fit {num_pairs} pairs and "
                         f"{num_queries} questions")
    keys, values = sample_pairs(rng, spec, num_pairs)
    asked = rng.choice(num_pairs, size=num_queries, replace=num_queries > num_pairs)
    words = [QUESTION, f"k{keys[asked[0]]}"] if query_first else []
    for key, value in zip(keys, values, strict=True):
        words += [f"k{key}"] + [f"v{x}" for x in value]
    for i in asked:
        words += [QUESTION, f"k{keys[i]}"] + [f"v{x}" for x in values[i]]
    words += [FILLER] * (body - num_pairs * spec.pair_len - num_queries * q_len)
    return " ".join(words)


def eval_example(rng: np.random.Generator, spec: KVSpec, num_pairs: int,
                 needle_pair: int | None = None) -> KVExample:
    """A prompt of ``1 + num_pairs * pair_len + 2`` tokens whose last two are ``? key``."""
    keys, values = sample_pairs(rng, spec, num_pairs)
    i = int(rng.integers(num_pairs)) if needle_pair is None else int(needle_pair)
    ctx = context_ids(spec, keys, values)
    ids = np.concatenate([ctx, [len(SPECIALS), spec.key_id(keys[i])]]).astype(np.int32)
    answer = np.array([spec.value_id(x) for x in values[i]], np.int32)
    return KVExample(ids=ids, answer=answer, needle=1 + i * spec.pair_len)


def straddling_pairs(spec: KVSpec, num_pairs: int, block_len: int) -> np.ndarray:
    """Indices of the pairs of an evaluation prompt (``<s>`` at position 0, pair ``i`` at
    ``1 + i * pair_len``) whose tokens span a boundary between two blocks of ``block_len``:
    the key on one host, (part of) its value on the next."""
    first = 1 + np.arange(num_pairs) * spec.pair_len
    last = first + spec.pair_len - 1
    return np.flatnonzero(first // block_len != last // block_len)


def make_tokenizer(spec: KVSpec, out_dir: str):
    """Write the word-level HF tokenizer directory; returns the fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cpmjax.train.tokenizer import save_tokenizer

    vocab = {w: i for i, w in enumerate(spec.vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(fast, out_dir)
    return fast


def write_corpus(out: str, *, docs: int, seq_len: int, spec: KVSpec, num_queries: int | None = None,
                 min_pairs: int | None = None, max_pairs: int | None = None,
                 seed: int = 0, query_first: float = 0.0) -> None:
    """``out/tokenizer`` (HF directory) and ``out/docs/NNNNNN.txt`` (one document each); a
    fraction ``query_first`` of the documents opens with its first question."""
    make_tokenizer(spec, os.path.join(out, "tokenizer"))
    doc_dir = os.path.join(out, "docs")
    os.makedirs(doc_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for d in range(docs):
        with open(os.path.join(doc_dir, f"{d:06d}.txt"), "w") as f:
            first = bool(rng.random() < query_first)
            f.write(training_document(rng, spec, seq_len, num_queries, min_pairs, max_pairs,
                                      query_first=first))
