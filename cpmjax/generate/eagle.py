"""The EAGLE draft model: one decoder layer that predicts the target's next feature.

The *feature* of a token is the target's final hidden state (normalised, divided by the μP width
scale), so that ``logits = feature @ head_weight().T``. At position ``i`` the draft reads the pair
``(feature_i, embedding(token_{i+1}))``, projects the concatenation back to the hidden size, runs
one decoder layer (causal attention over the earlier pairs, through its own KV cache) and a final
RMSNorm, and outputs ``feature_hat_{i+1}``; the target's frozen LM head turns that into the draft
distribution of ``token_{i+2}``. The draft owns only ``fc``, the layer and the norm: it shares the
target's embedding and head.

Training (``draft_loss`` / ``train_draft``) runs the frozen target over token sequences and fits
the draft to its own hidden states: smooth-L1 feature regression plus the cross-entropy between
the target's next-token distribution and the draft's. The loop, optimizer, schedule, checkpoints
and metrics are the training recipe's (``cpmjax.train.draft``, imported when a draft is trained,
so decoding never loads the training package).

Export: ``save_draft`` writes ``config.json`` (the layer's config plus an ``eagle_draft`` section)
and ``model.safetensors`` (atomically, through ``cpmjax.safetensors_io``); ``load_draft`` reads
them back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpmjax.errors import CheckpointError, ConfigError, MissingPathError, ShapeMismatchError
from cpmjax.hf import as_dtype
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.models.modules import RMSNorm, init_layer_cache, linear
from cpmjax.models.transformer import DecoderLayer, run_layers
from cpmjax.safetensors_io import TensorFiles, atomic_directory, save_file

__all__ = [
    "DRAFT_WEIGHTS",
    "EagleDraft",
    "check_compatible",
    "draft_config_for",
    "draft_loss",
    "load_draft",
    "new_draft",
    "save_draft",
    "target_features",
    "train_draft",
]

DRAFT_WEIGHTS = "model.safetensors"


def draft_config_for(target: ModelConfig, intermediate_size: int | None = None) -> ModelConfig:
    """The config of the draft's decoder layer for a given target: the target's width, heads
    and RoPE, one layer, plain (Llama) residuals."""
    heads = target.num_attention_heads
    if target.is_mla:
        head_dim, kv_heads, rope_scaling = target.hidden_size // heads, heads, None
    else:
        head_dim, kv_heads = target.head_dim, target.num_key_value_heads
        rope_scaling = target.rope_scaling
    return ModelConfig(
        model_type="llama",
        vocab_size=target.vocab_size,
        hidden_size=target.hidden_size,
        intermediate_size=intermediate_size or target.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=target.max_position_embeddings,
        rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=True,
        initializer_range=target.initializer_range,
        bos_token_id=target.bos_token_id,
        eos_token_id=target.eos_token_id,
        pad_token_id=target.pad_token_id,
    )


class EagleDraft(nnx.Module):
    """``draft(features [b, s, h], embeddings [b, s, h], positions=[b, s], cache=...)`` ->
    ``(predicted features [b, s, h], cache)``.

    ``features[:, i]`` is the target feature at position ``i``, ``embeddings[:, i]`` the target's
    embedding of token ``i + 1``; the output at ``i`` predicts the feature at ``i + 1``. Cache and
    mask arguments are those of ``CausalLM`` (``cache_slots``, ``attend_cache``, ``mask``)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        if config.num_hidden_layers != 1:
            raise ConfigError(
                f"an EAGLE draft has one decoder layer, config says {config.num_hidden_layers}"
            )
        self.config = config
        self.dtype = dtype
        h = config.hidden_size
        self.fc = linear(2 * h, h, ("mlp", "embed"), bias=True, std=config.initializer_range,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer = DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(h, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(
        self,
        features: jax.Array,
        embeddings: jax.Array,
        *,
        positions: jax.Array,
        cache: list | None = None,
        attend_cache: bool = False,
        mask: jax.Array | None = None,
        cache_slots: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, list | None]:
        x = jnp.concatenate([features.astype(self.dtype), embeddings.astype(self.dtype)], -1)
        x = self.fc(x)
        x, new_cache = run_layers(
            [self.layer], self.config, x, positions=positions, segment_ids=segment_ids,
            cache=cache, attend_cache=attend_cache, mask=mask, cache_slots=cache_slots,
        )
        return self.norm(x), new_cache

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list:
        dtype = self.dtype if dtype is None else as_dtype(dtype)
        return [init_layer_cache(self.config, batch, max_len, dtype)]

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def new_draft(target: CausalLM, *, seed: int = 0, dtype: Any = None,
              intermediate_size: int | None = None) -> EagleDraft:
    """A randomly initialised draft for ``target`` (same compute dtype unless given)."""
    dtype = target.dtype if dtype is None else dtype
    return EagleDraft(draft_config_for(target.config, intermediate_size), dtype=dtype,
                      param_dtype=dtype, rngs=nnx.Rngs(seed))


def check_compatible(draft: EagleDraft, target: CausalLM) -> None:
    """Raise ``ConfigError`` when the draft was not built for a target of this width."""
    if draft.config.hidden_size != target.config.hidden_size:
        raise ConfigError(
            f"draft hidden_size={draft.config.hidden_size} does not match the target's "
            f"hidden_size={target.config.hidden_size}"
        )


# ----------------------------------------------------------------------------------------------
# export / import
def _flat_params(module: nnx.Module) -> dict[str, Any]:
    return {".".join(str(p) for p in path): var
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def save_draft(draft: EagleDraft, path: str | os.PathLike, *, dtype: Any = None,
               metadata: dict[str, Any] | None = None) -> str:
    """Write ``config.json`` + ``model.safetensors`` (parameters in ``dtype``, default their own)."""
    path = os.fspath(path)
    config = draft.config.to_hf_dict()
    config["eagle_draft"] = {"format": 1, **(metadata or {})}
    tensors = {}
    for name, var in _flat_params(draft).items():
        value = var[...]
        if dtype is not None:
            value = value.astype(as_dtype(dtype))
        tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(value)))
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    with atomic_directory(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, DRAFT_WEIGHTS), metadata={"format": "eagle-draft"})
    return path


def load_draft(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> EagleDraft:
    """Load a draft written by ``save_draft``; every tensor is checked by name and shape."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"draft directory does not exist: {path}")
    cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, DRAFT_WEIGHTS)
    for file in (cfg_file, weights):
        if not os.path.isfile(file):
            raise MissingPathError(f"draft directory {path} has no {os.path.basename(file)}")
    with open(cfg_file) as f:
        hf = json.load(f)
    if "eagle_draft" not in hf:
        raise CheckpointError(f"{cfg_file} is not an EAGLE draft config (no 'eagle_draft' key)")
    hf.pop("eagle_draft")
    config = ModelConfig.from_hf_dict(hf)
    draft = nnx.eval_shape(lambda: EagleDraft(config, dtype=dtype, param_dtype=dtype))
    params = _flat_params(draft)
    files = TensorFiles(path, weights_name=DRAFT_WEIGHTS, index_name=None)
    names = set(files.names())
    missing = sorted(set(params) - names)
    unexpected = sorted(names - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"draft weights in {weights} do not match the config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, var in params.items():
        shape = files.shape(name)
        if shape != tuple(var.shape):
            raise ShapeMismatchError(
                f"draft tensor {name}: checkpoint shape {shape}, expected {tuple(var.shape)}"
            )
        var.set_value(jnp.asarray(files.get(name), dtype=as_dtype(dtype)))
    return draft


# ----------------------------------------------------------------------------------------------
# training
def target_features(target: CausalLM, ids: jax.Array) -> jax.Array:
    """The target's features ``[b, s, h]`` (float32) for token ids ``[b, s]``."""
    return target(ids, return_hidden=True).astype(jnp.float32)


def draft_loss(
    draft: EagleDraft,
    target: CausalLM,
    ids: jax.Array,
    *,
    feature_weight: float = 1.0,
    token_weight: float = 0.1,
    noise: float = 0.0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EAGLE training loss on token ids ``[b, s]``.

    The draft reads ``(feature_i, embed(token_{i+1}))`` for ``i < s - 1`` and is scored on
    ``feature_{i+1}``: smooth-L1 (summed over the hidden size, averaged over tokens) plus
    ``token_weight`` times the cross-entropy from the target's next-token distribution to the
    draft's. ``noise`` adds uniform noise of that half-width to the input features (robustness to
    the draft's own errors at tree depth > 1)."""
    feats = jax.lax.stop_gradient(target_features(target, ids))
    weight = jax.lax.stop_gradient(target.head_weight()).astype(jnp.float32)
    inputs = feats[:, :-1]
    if noise and key is not None:
        inputs = inputs + jax.random.uniform(key, inputs.shape, minval=-noise, maxval=noise)
    emb = jax.lax.stop_gradient(target.embed(ids[:, 1:]))
    b, s1 = ids.shape[0], ids.shape[1] - 1
    positions = jnp.broadcast_to(jnp.arange(s1, dtype=jnp.int32), (b, s1))
    pred, _ = draft(inputs, emb, positions=positions)
    pred = pred.astype(jnp.float32)
    goal = feats[:, 1:]
    feature_loss = jnp.mean(jnp.sum(optax.huber_loss(pred, goal, delta=1.0), axis=-1))
    target_logp = jax.nn.log_softmax(goal @ weight.T, axis=-1)
    draft_logp = jax.nn.log_softmax(pred @ weight.T, axis=-1)
    token_loss = -jnp.mean(jnp.sum(jnp.exp(target_logp) * draft_logp, axis=-1))
    top1 = jnp.mean((jnp.argmax(draft_logp, -1) == jnp.argmax(target_logp, -1)).astype(
        jnp.float32))
    loss = feature_weight * feature_loss + token_weight * token_loss
    return loss, {"loss": loss, "feature_loss": feature_loss, "token_loss": token_loss,
                  "top1": top1}


def train_draft(
    target: CausalLM,
    draft: EagleDraft,
    batches: Iterable[np.ndarray],
    *,
    steps: int,
    learning_rate: float = 3e-4,
    warmup: int = 20,
    token_weight: float = 0.1,
    noise: float = 0.0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 200,
    log_every: int = 20,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_dir: str | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train ``draft`` in place on the frozen ``target``'s hidden states (``draft_loss``).

    ``batches`` yields token-id arrays ``[batch, seq]``. The training recipe's AdamW with
    linear warmup and cosine decay (``cpmjax.train.draft``); with ``checkpoint_dir`` the draft
    and optimizer state are saved with the recipe's ``Checkpointer`` every
    ``checkpoint_every`` steps and at the end, and training resumes from the latest checkpoint
    found there; with ``log_dir`` the logged records also go to ``<log_dir>/metrics.jsonl``.
    Stops after ``steps`` steps, after ``max_seconds``, or when ``batches`` ends. Returns the
    logged metrics."""
    check_compatible(draft, target)
    from cpmjax.train.draft import train_against

    return train_against(
        draft, target, batches, loss=draft_loss,
        loss_kwargs={"token_weight": token_weight, "noise": noise}, steps=steps,
        learning_rate=learning_rate, warmup=warmup, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, log_every=log_every, log=log, log_dir=log_dir,
        max_seconds=max_seconds, seed=seed,
    )
