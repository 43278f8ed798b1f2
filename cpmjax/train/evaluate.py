"""Scoring a model on a training config's held-out data, outside the training loop."""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from cpmjax.errors import InputError, MissingPathError
from cpmjax.models import CausalLM
from cpmjax.train.setup import heldout_batches, prepare_data
from cpmjax.train.step import loss_fn, to_device

__all__ = ["heldout_data", "heldout_loss"]

# small caches: a density or model comparison scores many models on one held-out set
_CACHE_SIZE = 4
_DATA: collections.OrderedDict[str, tuple[Any, np.ndarray | None]] = collections.OrderedDict()
_BATCHES: collections.OrderedDict[str, list[dict[str, Any]]] = collections.OrderedDict()
_STEPS: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def _remember(cache: collections.OrderedDict, key: Any, make: Any) -> Any:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def heldout_data(config: Any) -> tuple[Any, np.ndarray | None]:
    """``(tokenizer, held-out tokens or None)`` of a training config, tokenized once into its
    token cache and remembered for the process. It never trains a tokenizer: a config that
    names none, with none in its run directory, raises ``MissingPathError``."""
    d = config.data
    tok_dir = d.tokenizer or os.path.join(config.run.out_dir, "tokenizer")
    if not d.tokenizer and not os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
        raise MissingPathError(
            f"no tokenizer for the held-out data: the config names none (data.tokenizer) and "
            f"{tok_dir} holds none; scoring does not train one, so name the tokenizer the "
            "model was trained with")

    def prepare() -> tuple[Any, np.ndarray | None]:
        tokenizer, _, eval_tokens = prepare_data(config)
        return tokenizer, eval_tokens

    return _remember(_DATA, _key(d.model_dump(mode="json"), config.cache_dir, tok_dir), prepare)


def _batches(config: Any) -> tuple[Any, list[dict[str, Any]]]:
    tokenizer, eval_tokens = heldout_data(config)
    key = _key(config.data.model_dump(mode="json"), config.cache_dir, config.run.eval_batches)
    return tokenizer, _remember(_BATCHES, key,
                                lambda: heldout_batches(config, tokenizer, eval_tokens))


def _eval_step(graphdef: Any, chunk: int) -> Any:
    """The jitted held-out step for one model structure and loss chunk (one compilation per
    shape, not per model)."""

    def make() -> Any:
        @jax.jit
        def evaluate(state, batch):
            loss, aux = loss_fn(nnx.merge(graphdef, state), batch, chunk, remat=False)
            return loss, aux["tokens"]

        return evaluate

    try:
        return _remember(_STEPS, (graphdef, chunk), make)
    except TypeError:  # an unhashable structure: compile for this call only
        return make()


def heldout_loss(model: CausalLM, config: Any) -> float:
    """The loss the training loop reports as ``eval_loss`` for ``config``, of any ``model``: the
    token-weighted mean next-token loss over the first ``run.eval_batches`` packed batches of
    the config's held-out files (same tokenizer, token cache, packing and loss chunking), so
    models trained elsewhere, compressed or changed can be compared on one held-out set.
    The held-out batches and the compiled step are remembered across calls (per config and
    per model structure). A model whose vocabulary is smaller than the tokenizer's raises
    ``InputError``; a config without a tokenizer raises ``MissingPathError``."""
    tokenizer, batches = _batches(config)
    if model.config.vocab_size < len(tokenizer):
        raise InputError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                         f"the held-out data's tokenizer ({len(tokenizer)} entries, "
                         f"{config.data.tokenizer}): a model of another tokenizer cannot be "
                         "scored on these tokens")
    if not batches:
        raise InputError(f"no held-out batch in {config.data.sources} (eval_fraction "
                         f"{config.data.eval_fraction}, run.eval_batches "
                         f"{config.run.eval_batches})")
    graphdef, state = nnx.split(model)
    evaluate = _eval_step(graphdef, config.run.loss_chunk)
    total, count = 0.0, 0.0
    for batch in batches:
        loss, tokens = evaluate(state, to_device(batch, None))
        total += float(loss) * float(tokens)
        count += float(tokens)
    return total / max(count, 1.0)
