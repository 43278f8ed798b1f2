"""Soft prompt tuning (Lester et al., 2021): ``num_tokens`` learned embeddings prepended to the
embedded input. The embedding module's output ``[b, s, d]`` becomes ``[b, num_tokens + s, d]``;
a second, parameter-free site (``strip_at``, for cpmjax models the final norm ``model.norm``)
drops those positions again so that the model's output keeps shape ``[b, s, ...]``.

The prompt is initialised from the embeddings of random vocabulary rows (as in the paper).
Use it for full-sequence forward passes (training, scoring) with default positions; for
generation with a KV cache use prefix tuning, which gives every step the same extra context.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax.delta._addressing import Entry, _cpmjax_config, feature_dims
from cpmjax.delta._core import DeltaModule, DeltaParam, map_main
from cpmjax.errors import DeltaError

DEFAULTS: dict[str, Any] = {"num_tokens": 20, "strip_at": "auto", "dim": None,
                            "param_dtype": "float32"}


class SoftPrompt(DeltaModule):
    """Prepends ``prompt [num_tokens, d]`` to the embedding output ``[b, s, d]``."""

    method = "soft_prompt"

    def __init__(self, prompt: jax.Array):
        self.prompt = DeltaParam(prompt, logical_axes=(None, "embed"))

    def wrap(self, fn, args, kwargs):
        out = fn(*args, **kwargs)

        def prepend(y: jax.Array) -> jax.Array:
            prompt = jnp.broadcast_to(self.prompt[...].astype(y.dtype),
                                      (y.shape[0], *self.prompt.shape))
            return jnp.concatenate([prompt, y], axis=1)

        return map_main(out, prepend)


class PromptStrip(DeltaModule):
    """Drops the first ``num_tokens`` positions of the output ``[b, p + s, ...]``."""

    method = "soft_prompt"

    def __init__(self, num_tokens: int):
        self.num_tokens = int(num_tokens)

    def wrap(self, fn, args, kwargs):
        return map_main(fn(*args, **kwargs), lambda y: y[:, self.num_tokens:])


def build(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
          ) -> list[tuple[str, DeltaModule]]:
    if len(entries) != 1:
        raise DeltaError(
            f"soft_prompt attaches to exactly one embedding module; targets matched "
            f"{[e.path for e in entries]}"
        )
    entry = entries[0]
    p = int(hp["num_tokens"])
    _, d = feature_dims(model, entry, hp["dim"])
    table = getattr(entry.module, "embedding", None)
    dtype = jnp.dtype(hp["param_dtype"])
    if isinstance(table, nnx.Variable):
        rows = jax.random.randint(rngs.params(), (p,), 0, table.shape[0])
        prompt = table[...][rows].astype(dtype)
    else:
        prompt = 0.02 * jax.random.normal(rngs.params(), (p, d), dtype)
    out: list[tuple[str, DeltaModule]] = [(entry.path, SoftPrompt(prompt))]
    strip_at = hp["strip_at"]
    if strip_at == "auto":
        strip_at = "model.norm" if _cpmjax_config(model) is not None else None
    if strip_at:
        out.append((strip_at, PromptStrip(p)))
    return out
