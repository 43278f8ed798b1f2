"""Measuring specialists, generalists and fused models on held-out instruction/response
examples (what ``scripts/bench_ultrafuser.py`` reports):

- ``domain_response_loss``: mean next-token loss over the response tokens (after the marker),
  token-weighted over all examples of a domain; works for a ``CausalLM`` and a ``FusedLM``.
- ``exact_match``: greedy decoding from each prompt (up to the marker line) and the share of
  examples whose stated final answer (``cpmjax.fusion.data.math_answer``) is the exact one.
- ``mean_gate_weights``: the fused model's gate weights averaged over the response tokens of a
  domain's examples, ``[num_specialists]``.
- ``decode_speed``: decode tokens per second of several models measured side by side (the
  models interleaved within every repeat, medians over repeats).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.fusion.data import math_answer, split_example
from cpmjax.fusion.model import FusedLM
from cpmjax.fusion.train import encode_examples, response_loss
from cpmjax.generate import generate
from cpmjax.train.data import pack_rows
from cpmjax.train.setup import marker_token_id

__all__ = [
    "decode_speed",
    "domain_response_loss",
    "exact_match",
    "load_heldout",
    "mean_gate_weights",
]


def load_heldout(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The examples of a held-out JSONL file (``write_domain_files``' ``heldout.jsonl``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingPathError(f"held-out file does not exist: {path}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ConfigError(f"held-out file {path} holds no examples")
    return rows


def _batches(texts: Sequence[str], tokenizer: Any, seq_len: int, marker: str,
             batch_size: int):
    rows = encode_examples(texts, tokenizer, seq_len)
    pad = tokenizer.pad_token_id
    marker_id = marker_token_id(tokenizer, marker)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if len(chunk) < batch_size:  # one compiled shape: pad with copies, masked out below
            filler = np.repeat(chunk[:1], batch_size - len(chunk), axis=0)
            batch = pack_rows(np.concatenate([chunk, filler]), tokenizer.bos_token_id, pad,
                              marker_id)
            batch["loss_mask"][len(chunk):] = 0.0
        else:
            batch = pack_rows(chunk, tokenizer.bos_token_id, pad, marker_id)
        yield batch


@nnx.jit
def _loss_sums(model, batch):
    loss, aux = response_loss(model, batch)
    return loss * aux["tokens"], aux["tokens"]


def domain_response_loss(model: Any, tokenizer: Any, texts: Sequence[str], *,
                         seq_len: int = 128, marker: str = "###", batch_size: int = 8
                         ) -> float:
    """Token-weighted mean response loss (nats per token) of ``model`` on ``texts``."""
    total, count = 0.0, 0.0
    for batch in _batches(texts, tokenizer, seq_len, marker, batch_size):
        s, n = _loss_sums(model, {k: jnp.asarray(v) for k, v in batch.items()})
        total += float(s)
        count += float(n)
    if count == 0:
        raise ConfigError("no response tokens to score (is the marker in the examples?)")
    return total / count


def exact_match(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], *,
                max_new_tokens: int = 48, batch_size: int = 16) -> float:
    """Share of ``examples`` (each with ``text`` and an integer ``answer``) whose greedy
    response states exactly that answer (``The answer is N``)."""
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [tokenizer(split_example(e["text"])[0], add_special_tokens=True)["input_ids"]
                   for e in chunk]
        result = generate(model, prompts, max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          stop_token_ids=[tokenizer.eos_token_id])
        for i, e in enumerate(chunk):
            text = tokenizer.decode(result.row(i), skip_special_tokens=True)
            correct += int(math_answer(text) == int(e["answer"]))
    return correct / len(examples)


@nnx.jit
def _gate_sums(fused, input_ids, positions, mask):
    weights = fused.gate_weights(input_ids, positions=positions)
    return jnp.einsum("bsk,bs->k", weights, mask), jnp.sum(mask)


def mean_gate_weights(fused: FusedLM, tokenizer: Any, texts: Sequence[str], *,
                      seq_len: int = 128, marker: str = "###", batch_size: int = 8
                      ) -> np.ndarray:
    """``[num_specialists]``: the gate weights averaged over every response token (the
    positions whose next token is scored) of ``texts``."""
    total = np.zeros(fused.num_specialists)
    count = 0.0
    for batch in _batches(texts, tokenizer, seq_len, marker, batch_size):
        s, n = _gate_sums(fused, jnp.asarray(batch["input_ids"]),
                          jnp.asarray(batch["positions"]), jnp.asarray(batch["loss_mask"]))
        total += np.asarray(s)
        count += float(n)
    return total / max(count, 1.0)


def decode_speed(models: dict[str, Any], prompts: Sequence[Sequence[int]], *,
                 new_tokens: int = 32, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Decode tokens/s of each model on the same greedy request, measured side by side: one
    warm-up each (compiles), then ``repeats`` rounds in which every model runs once in turn.
    Returns ``{name: {"median_tokens_per_second", "min", "max", "runs"}}`` (decode phase only:
    prefill and compile excluded; no stop token, so every run decodes ``new_tokens``)."""
    for model in models.values():
        generate(model, prompts, new_tokens)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            stats = generate(model, prompts, new_tokens).stats
            samples[name].append(stats.decode_tokens_per_second)
    jax.effects_barrier()
    return {name: {"median_tokens_per_second": statistics.median(v), "min": min(v),
                   "max": max(v), "runs": len(v)} for name, v in samples.items()}
