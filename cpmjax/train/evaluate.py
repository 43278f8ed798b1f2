"""Scoring a model on a training config's held-out data, outside the training loop."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from cpmjax.errors import InputError
from cpmjax.models import CausalLM
from cpmjax.train.setup import make_batches, prepare_data
from cpmjax.train.step import loss_fn, to_device

__all__ = ["heldout_loss"]


def heldout_loss(model: CausalLM, config: Any) -> float:
    """The loss the training loop reports as ``eval_loss`` for ``config``, of any ``model``: the
    token-weighted mean next-token loss over the first ``run.eval_batches`` packed batches of
    the config's held-out files (same tokenizer, token cache, packing and loss chunking), so
    models trained elsewhere, compressed or changed can be compared on one held-out set.
    A model whose vocabulary is smaller than the tokenizer's raises ``InputError``."""
    tokenizer, train_tokens, eval_tokens = prepare_data(config)
    if model.config.vocab_size < len(tokenizer):
        raise InputError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                         f"the held-out data's tokenizer ({len(tokenizer)} entries, "
                         f"{config.data.tokenizer}): a model of another tokenizer cannot be "
                         "scored on these tokens")
    _, batches = make_batches(config, tokenizer, train_tokens, eval_tokens)
    if not batches:
        raise InputError(f"no held-out batch in {config.data.sources} (eval_fraction "
                         f"{config.data.eval_fraction}, run.eval_batches "
                         f"{config.run.eval_batches})")
    graphdef, state = nnx.split(model)
    chunk = config.run.loss_chunk

    @jax.jit
    def evaluate(state, batch):
        loss, aux = loss_fn(nnx.merge(graphdef, state), batch, chunk, remat=False)
        return loss, aux["tokens"]

    total, count = 0.0, 0.0
    for batch in batches:
        loss, tokens = evaluate(state, to_device(batch, None))
        total += float(loss) * float(tokens)
        count += float(tokens)
    return total / max(count, 1.0)
