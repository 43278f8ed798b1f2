"""Building what a training run needs from its ``TrainConfig``: the model (fresh μP-initialised
or pretrained), the trainable set (with a delta), the schedule and optimizer, the device mesh,
the tokenizer and token files, and the packed batches.

- ``build_model(config, vocab_size)``: a fresh (μP-initialised) or pretrained ``CausalLM``;
- ``make_optimizer(config, model)``: AdamW + μP groups + the configured schedule;
- ``make_training_mesh(config)``: the mesh and, with ``run.mesh.sequence > 1``, a
  ``SequenceParallel``;
- ``prepare_data(config)`` / ``make_batches(...)``: tokenizer, token files, packed batches.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpmjax.errors import ConfigError
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.config import TrainConfig, check_sequence_parallel
from cpmjax.train.data import (
    PackedBatches,
    collect_files,
    open_memmap,
    split_files,
    tokenize_to_memmap,
)
from cpmjax.train.optim import MATRIX, adamw_mup, mup_group
from cpmjax.train.schedules import cosine_schedule, wsd_schedule
from cpmjax.train.step import SequenceParallel

# ----------------------------------------------------------------------------------------------
# model and optimizer


def mup_initialize(model: CausalLM, init_std: float, seed: int = 0) -> None:
    """μP initialisation (MiniCPM): matrices inside the blocks ~ N(0, (init_std /
    sqrt(width_scale))^2), embeddings / head ~ N(0, init_std^2); norms stay 1, biases 0."""
    width = model.config.width_scale
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        if var.ndim < 2:
            continue
        std = init_std / math.sqrt(width) if mup_group(path, var.ndim) == MATRIX else init_std
        value = std * jax.random.normal(jax.random.fold_in(key, i), var.shape, jnp.float32)
        var.set_value(value.astype(var.dtype))


def model_config_from(config: TrainConfig, vocab_size: int) -> ModelConfig:
    fields = dict(config.model.config)
    if not fields.get("vocab_size"):
        fields["vocab_size"] = -(-vocab_size // 128) * 128
    if fields["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
            f"{vocab_size} entries"
        )
    fields.setdefault("model_type", "minicpm")
    return ModelConfig.from_hf_dict(fields)


def build_model(config: TrainConfig, vocab_size: int) -> CausalLM:
    """A fresh model from ``config.model.config`` (μP init when ``init_std`` is set) or the
    checkpoint at ``config.model.init_from``."""
    if config.model.init_from:
        from cpmjax.hf import from_pretrained

        model = from_pretrained(config.model.init_from, dtype=config.model.dtype)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"{config.model.init_from} has vocab_size={model.config.vocab_size} < the "
                f"tokenizer's {vocab_size}"
            )
        return model
    mc = model_config_from(config, vocab_size)
    model = CausalLM(mc, dtype=config.model.dtype, param_dtype="float32",
                     rngs=nnx.Rngs(config.run.seed))
    if config.model.init_std is not None:
        mup_initialize(model, config.model.init_std, config.run.seed)
    return model


def make_schedule(config: TrainConfig) -> optax.Schedule:
    o = config.optim
    if o.schedule == "constant":
        return wsd_schedule(o.lr, o.warmup_steps, None)
    if o.schedule == "cosine":
        return cosine_schedule(o.lr, o.warmup_steps, config.run.steps, min_ratio=o.cosine_min_ratio)
    return wsd_schedule(o.lr, o.warmup_steps, config.decay_start, config.decay_steps,
                        decay=o.decay, half_life=o.half_life, min_ratio=o.min_ratio)


def make_optimizer(config: TrainConfig, model: CausalLM) -> optax.GradientTransformation:
    o = config.optim
    width = model.config.width_scale if o.mup else 1.0
    return adamw_mup(make_schedule(config), width_scale=width, b1=o.b1, b2=o.b2, eps=o.eps,
                     weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def trainable_filter(config: TrainConfig, model: CausalLM) -> Any:
    """``nnx.Param`` or, with a delta configured, the delta's parameters (after attaching it):
    ``delta.inherit`` is loaded first (``cpmjax.delta.inherit``) and trains too."""
    if not (config.delta.method or config.delta.inherit):
        return nnx.Param
    import cpmjax.delta as delta_lib

    if config.delta.inherit:
        delta_lib.inherit(config.delta.inherit, model)
    if config.delta.method:
        name = "default"
        if name in delta_lib.names(model):
            name = config.delta.method
        delta_lib.attach(model, config.delta.method, name=name, targets=config.delta.targets,
                         **config.delta.hparams)
    return delta_lib.trainable(model)


def calibration_ids(config: TrainConfig, tokenizer: Any, train_tokens: np.ndarray
                    ) -> list[np.ndarray]:
    """The first ``compress.calibration_batches`` packed batches of the training tokens (in
    stream order, not shuffled) as token ids ``[batch, seq]``, for Wanda and MoEfication."""
    batches = PackedBatches(train_tokens, config.data.batch_size, config.data.seq_len,
                            shuffle=False, bos_id=tokenizer.bos_token_id,
                            pad_id=tokenizer.pad_token_id)
    return [b["input_ids"] for b in batches.fixed_batches(config.compress.calibration_batches)]


def compress_model(config: TrainConfig, model: CausalLM, calibration: Any = None) -> list[str]:
    """Apply ``config.compress`` to ``model`` in place (prune, prune_neurons, moefy, then
    quantize; before
    any delta is attached); returns what was done. ``calibration``: token ids for Wanda and
    MoEfication (``calibration_ids``). Bad settings raise ``CompressionError`` before any
    compute."""
    import cpmjax.compress as compress_lib

    c, done = config.compress, []
    if c.prune is not None:
        compress_lib.prune(model, c.prune.sparsity, c.prune.pattern, c.prune.criterion,
                           calibration=calibration)
        done.append(f"prune {c.prune.pattern} {c.prune.sparsity:g} ({c.prune.criterion})")
    if c.prune_neurons is not None:
        compress_lib.prune_neurons(model, c.prune_neurons.sparsity, c.prune_neurons.criterion,
                                   calibration=calibration)
        done.append(f"prune neurons {c.prune_neurons.sparsity:g} "
                    f"({c.prune_neurons.criterion})")
    if c.moefy is not None:
        compress_lib.moefy(model, c.moefy.num_experts, c.moefy.top_k, calibration=calibration)
        done.append(f"moefy {c.moefy.num_experts} experts, top {c.moefy.top_k}")
    if c.quantize is not None:
        compress_lib.quantize(model, bits=c.quantize.bits, group_size=c.quantize.group_size)
        group = c.quantize.group_size
        fmt = "nf4" if c.quantize.bits == "nf4" else f"int{c.quantize.bits}"
        done.append(f"{fmt} " + (f"groups of {group}" if group else "per channel"))
    return done


def prepare_student(config: TrainConfig, model: CausalLM, calibration: Any = None
                    ) -> tuple[Any, Any]:
    """The CPET part of setting up ``model``: the teacher is taken (before compression, for
    ``distill.teacher: self-uncompressed``), the model compressed, the deltas attached, and the
    teacher checked against the student (``ConfigError`` naming both, before any compute).
    Returns ``(wrt, teacher or None)``."""
    from cpmjax.train.distill import build_teacher, check_teacher

    teacher = build_teacher(config, model)
    if teacher is not None:
        check_teacher(config, model, teacher)
    if config.compress.active:
        compress_model(config, model, calibration)
    return trainable_filter(config, model), teacher


# ----------------------------------------------------------------------------------------------
# mesh


def make_training_mesh(config: TrainConfig) -> tuple[Any, SequenceParallel | None]:
    """``(mesh or None, SequenceParallel or None)`` for ``config.run.mesh``: no mesh on one
    device; a ``SequenceParallel`` when ``run.mesh.sequence > 1``. Raises ``ConfigError`` (naming
    the setting) when ``data.seq_len`` cannot be laid out over the sequence devices and
    ``ShardingError`` when the mesh needs more devices than exist."""
    from sharding.mesh import make_mesh

    check_sequence_parallel(config)
    m = config.run.mesh
    processes = jax.process_count()
    if processes > 1 and m.num_devices != jax.device_count():
        raise ConfigError(
            f"run.mesh {m.data},{m.fsdp},{m.tensor},{m.sequence} covers {m.num_devices} devices, "
            f"but the {processes} processes of this run have {jax.device_count()}: a "
            "multi-process mesh must use every device (e.g. --mesh "
            f"{jax.device_count() // m.fsdp // m.tensor // m.sequence or 1},{m.fsdp},"
            f"{m.tensor},{m.sequence})"
        )
    if m.num_devices == 1:
        return None, None
    mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, sequence=m.sequence)
    if m.sequence == 1:
        return mesh, None
    return mesh, SequenceParallel(mesh, impl=m.sequence_impl, layout=m.sequence_layout)


# ----------------------------------------------------------------------------------------------
# data


def prepare_data(config: TrainConfig) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """(tokenizer, train tokens, eval tokens or None): loads or trains the tokenizer and
    tokenizes the corpus once into ``<cache_dir>/{train,eval}.bin``."""
    from cpmjax.train.tokenizer import load_training_tokenizer, train_bpe

    cache = config.cache_dir
    os.makedirs(cache, exist_ok=True)
    files = collect_files(config.data.sources)
    train_files, eval_files = split_files(files, config.data.eval_fraction)
    if config.data.max_files:
        train_files = train_files[: config.data.max_files]
        eval_files = eval_files[: max(1, config.data.max_files // 8)]
    tok_dir = config.data.tokenizer or os.path.join(config.run.out_dir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
        tokenizer = load_training_tokenizer(tok_dir)
    elif config.data.tokenizer:
        tokenizer = load_training_tokenizer(config.data.tokenizer)
    else:
        tokenizer = train_bpe([f.path for f in train_files], tok_dir, config.data.vocab_size)
    def cached(files, path):
        # reuse a token file built from the same number of files with the same vocabulary
        if os.path.isfile(path + ".json"):
            with open(path + ".json") as f:
                meta = json.load(f)
            if meta.get("files") == len(files) and meta.get("vocab_size") == len(tokenizer):
                return open_memmap(path)
        return tokenize_to_memmap(files, tokenizer, path)

    train_tokens = cached(train_files, os.path.join(cache, "train.bin"))
    eval_tokens = cached(eval_files, os.path.join(cache, "eval.bin")) if eval_files else None
    return tokenizer, train_tokens, eval_tokens


def marker_token_id(tokenizer: Any, marker: str | None) -> int | None:
    """The id of ``data.loss_after``: the marker must be one token of the tokenizer (a
    vocabulary entry, or text that encodes to exactly one id)."""
    if marker is None:
        return None
    vocab = tokenizer.get_vocab()
    if marker in vocab:
        return int(vocab[marker])
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(
            f"data.loss_after={marker!r} is not one token of the tokenizer (it encodes to "
            f"{len(ids)} ids {list(ids)[:8]}); pick a single-token marker"
        )
    return int(ids[0])


def make_batches(config: TrainConfig, tokenizer: Any, train_tokens: np.ndarray,
                 eval_tokens: np.ndarray | None, rows: tuple[int, int] | None = None
                 ) -> tuple[PackedBatches, list[dict[str, Any]]]:
    """``(train batches, fixed eval batches)``: the resumable packed training stream and the
    first ``run.eval_batches`` packed batches of the held-out tokens (none when there are no
    eval tokens or too few for one batch). ``rows``: this process's rows of every global batch
    (``cpmjax.train.data.process_rows``; default all)."""
    run = config.run
    loss_after_id = marker_token_id(tokenizer, config.data.loss_after)
    batches = PackedBatches(train_tokens, config.data.batch_size, config.data.seq_len,
                            seed=run.seed, shuffle=config.data.shuffle,
                            bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id,
                            loss_after_id=loss_after_id, rows=rows)
    return batches, heldout_batches(config, tokenizer, eval_tokens, rows)


def heldout_batches(config: TrainConfig, tokenizer: Any, eval_tokens: np.ndarray | None,
                    rows: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The first ``run.eval_batches`` packed batches of the held-out tokens, unshuffled (none
    when there are no eval tokens or too few for one batch)."""
    if eval_tokens is None or config.run.eval_batches <= 0:
        return []
    try:
        return PackedBatches(
            eval_tokens, config.data.batch_size, config.data.seq_len, shuffle=False,
            bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id,
            loss_after_id=marker_token_id(tokenizer, config.data.loss_after), rows=rows,
        ).fixed_batches(config.run.eval_batches)
    except ConfigError:
        return []
