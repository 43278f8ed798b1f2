"""The training loop: data → jitted (optionally sharded) train step → optax → orbax checkpoints,
with a progress bar, JSON-lines metrics (and TensorBoard when ``tensorboardX`` is installed).

``train(config)`` is what ``cpmjax train`` runs. Pieces usable on their own:

- ``build_model(config, vocab_size)``: a fresh (μP-initialised) or pretrained ``CausalLM``;
- ``make_optimizer(config, model)``: AdamW + μP groups + the configured schedule;
- ``make_train_step(graphdef, chunk)``: the pure step ``(state, batch) -> (state, metrics)``;
- ``SequenceParallel(mesh, impl, layout)``: lay a batch out over the ``sequence`` mesh axis and
  run a step under the ``"burst"`` attention backend (``run.mesh.sequence > 1``);
- ``flops_per_token(model_config, seq_len)`` and ``measure_matmul_peak()`` for MFU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpmjax import ops
from cpmjax.errors import ConfigError, NonFiniteLossError, ShapeMismatchError
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.checkpoint import Checkpointer
from cpmjax.train.config import TrainConfig, check_sequence_parallel, dump_config
from cpmjax.train.data import (
    PackedBatches,
    collect_files,
    open_memmap,
    split_files,
    tokenize_to_memmap,
)
from cpmjax.train.loss import chunked_cross_entropy
from cpmjax.train.optim import MATRIX, adamw_mup, mup_group
from cpmjax.train.schedules import cosine_schedule, wsd_schedule

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
    """``nnx.Param`` or, with a delta configured, the delta's parameters (after attaching it)."""
    if not config.delta.method:
        return nnx.Param
    import cpmjax.delta as delta_lib

    delta_lib.attach(model, config.delta.method, targets=config.delta.targets,
                     **config.delta.hparams)
    return delta_lib.trainable(model)


# ----------------------------------------------------------------------------------------------
# the step


def loss_fn(model: CausalLM, batch: dict[str, jax.Array], chunk: int, remat: bool = True
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Chunked next-token loss of one packed batch (see ``cpmjax.train.loss``)."""
    hidden = model(batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], return_hidden=True)
    return chunked_cross_entropy(hidden, model.head_weight(), batch["targets"],
                                 batch["loss_mask"], chunk_size=chunk, remat=remat)


def make_train_step(graphdef: Any, wrt: Any, chunk: int = 128, remat: bool = True
                    ) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]:
    """The pure train step over the split state of ``(model, optimizer)``:
    ``step(state, batch) -> (new_state, {"loss", "grad_norm", "param_norm", "accuracy",
    "tokens"})``; ``loss`` is that of the parameters before the update, ``param_norm`` the norm
    of the trainable parameters after it.
    Jit it (``jax.jit(step, donate_argnums=0)``); with sharded inputs it runs SPMD."""

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch, chunk, remat),
                                     argnums=nnx.DiffState(0, wrt), has_aux=True)
        (loss, aux), grads = grad_fn(model)
        optimizer.update(model, grads)
        param_norm = optax.tree.norm(nnx.state(model, wrt))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": param_norm,
                   **aux}
        return nnx.state((model, optimizer)), metrics

    return step


def make_eval_step(graphdef: Any, chunk: int = 128):
    def evaluate(state, batch):
        model, _ = nnx.merge(graphdef, state)
        loss, aux = loss_fn(model, batch, chunk)
        return loss, aux["tokens"]

    return evaluate


# ----------------------------------------------------------------------------------------------
# sequence parallelism


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Sequence parallelism of the train and eval steps on a mesh with a ``sequence`` axis.

    :meth:`shard_batch` puts every per-token array of a batch (``[batch, seq]``: input_ids,
    targets, positions, segment_ids, loss_mask) in layout order (``sharding.layout.to_layout``:
    with ``"zigzag"`` device ``r`` of the ``G`` sequence devices holds chunks ``r`` and
    ``2G - 1 - r`` of ``2G``, so causal work is balanced) and shards it batch over
    ``data``/``fsdp`` and sequence over ``sequence``. :meth:`wrap` runs a step function under
    the ``"burst"`` attention backend (``sharding.burst``: exact ring attention, ``impl`` one of
    ``auto|burst|ring|allgather``). Positions travel with their tokens (RoPE sees the true
    positions) and the ring masks by true token index, so every token's loss is the one of the
    natural order; the loss and accuracy are means over tokens, hence unchanged, and so are the
    gradients. The data iterator never sees the layout (its position and resume are as
    without it)."""

    mesh: Any  # jax.sharding.Mesh with a "sequence" axis
    impl: str = "auto"
    layout: str = "zigzag"

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape["sequence"])

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``{name: [batch, seq]}`` in natural order -> the same arrays in layout order, placed
        with ``batch_sharding(mesh, sequence=True)``."""
        from sharding.layout import check_layout, to_layout
        from sharding.mesh import batch_sharding

        sharding = batch_sharding(self.mesh, sequence=True)
        out = {}
        for name, x in batch.items():
            if np.ndim(x) != 2:
                raise ShapeMismatchError(
                    f"batch[{name!r}] must be [batch, seq] for sequence parallelism, got shape "
                    f"{tuple(np.shape(x))}")
            check_layout(self.layout, x.shape[1], self.num_shards)
            out[name] = jax.device_put(to_layout(x, self.num_shards, self.layout), sharding)
        return out

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` traced under ``ops.attention_backend("burst", mesh=, impl=, layout=)``; jit
        the result (the backend is chosen when ``jit`` traces)."""

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with ops.attention_backend("burst", mesh=self.mesh, impl=self.impl,
                                       layout=self.layout):
                return fn(*args, **kwargs)

        return wrapped


def make_training_mesh(config: TrainConfig) -> tuple[Any, SequenceParallel | None]:
    """``(mesh or None, SequenceParallel or None)`` for ``config.run.mesh``: no mesh on one
    device; a ``SequenceParallel`` when ``run.mesh.sequence > 1``. Raises ``ConfigError`` (naming
    the setting) when ``data.seq_len`` cannot be laid out over the sequence devices and
    ``ShardingError`` when the mesh needs more devices than exist."""
    from sharding.mesh import make_mesh

    check_sequence_parallel(config)
    m = config.run.mesh
    if m.num_devices == 1:
        return None, None
    mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, sequence=m.sequence)
    if m.sequence == 1:
        return mesh, None
    return mesh, SequenceParallel(mesh, impl=m.sequence_impl, layout=m.sequence_layout)


# ----------------------------------------------------------------------------------------------
# throughput


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): ``6 * matmul parameters``
    (the LM head counted, the embedding lookup not) plus causal attention
    ``6 * layers * seq_len * heads * head_dim``."""
    embed = mc.vocab_size * mc.hidden_size
    norms = mc.hidden_size * (2 * mc.num_hidden_layers + 1)
    matmul = mc.num_parameters() - embed - norms
    if mc.tie_word_embeddings:
        matmul += embed
    attn = 6 * mc.num_hidden_layers * seq_len * mc.num_attention_heads * mc.qk_head_dim
    return 6.0 * matmul + attn


_MATMUL = jax.jit(lambda x: x @ x)


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of the default device (best of ``repeats``): the peak
    MFU is quoted against on CPU. On a shared machine one measurement can come out low, so the
    training loop re-measures at every log step and keeps the maximum seen."""
    a = jnp.ones((n, n), jnp.float32)
    f = _MATMUL
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


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


# ----------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """JSON lines at ``<out_dir>/metrics.jsonl`` plus TensorBoard scalars when available."""

    def __init__(self, out_dir: str, tensorboard: bool = True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# the loop


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: list[float]
    final_loss: float | None
    eval_loss: float | None
    tokens_seen: int
    export_dir: str | None
    stopped_early: bool = False


def _to_device(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
    if sharding is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def _pin_to_mesh(state: Any, mesh: Any) -> tuple[Any, Any]:
    """``(state, shardings)``: leaves not yet on ``mesh`` (optimizer counters) replicated onto
    it. Jitting the step with ``out_shardings=shardings`` hands back the state exactly as it came
    in, so the second step hits the compilation cache instead of compiling again."""
    from jax.sharding import NamedSharding, PartitionSpec

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    state = jax.tree.map(place, state)
    return state, jax.tree.map(lambda x: x.sharding, state)


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


def train(config: TrainConfig, *, export: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns the losses of the steps
    this call ran. A NaN/inf loss raises ``NonFiniteLossError`` before anything is saved, so
    the last good checkpoint stays the latest."""
    from sharding.mesh import batch_sharding, shard_model

    run = config.run
    mesh, seq_parallel = make_training_mesh(config)  # validate before any data work
    os.makedirs(run.out_dir, exist_ok=True)
    dump_config(config, os.path.join(run.out_dir, "config.yaml"))
    tokenizer, train_tokens, eval_tokens = prepare_data(config)
    loss_after_id = marker_token_id(tokenizer, config.data.loss_after)
    batches = PackedBatches(train_tokens, config.data.batch_size, config.data.seq_len,
                            seed=run.seed, shuffle=config.data.shuffle,
                            bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id,
                            loss_after_id=loss_after_id)
    eval_batches = []
    if eval_tokens is not None and run.eval_batches > 0:
        try:
            eval_batches = PackedBatches(
                eval_tokens, config.data.batch_size, config.data.seq_len, shuffle=False,
                bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id,
                loss_after_id=loss_after_id,
            ).fixed_batches(run.eval_batches)
        except ConfigError:
            eval_batches = []

    model = build_model(config, len(tokenizer))
    wrt = trainable_filter(config, model)
    if mesh is not None:
        shard_model(model, mesh)
    optimizer = nnx.Optimizer(model, make_optimizer(config, model), wrt=wrt)
    graphdef, state = nnx.split((model, optimizer))
    schedule = make_schedule(config)
    train_step = make_train_step(graphdef, wrt, run.loss_chunk, run.loss_remat)
    eval_step = make_eval_step(graphdef, run.loss_chunk)
    if seq_parallel is not None:
        train_step, eval_step = seq_parallel.wrap(train_step), seq_parallel.wrap(eval_step)
        to_device = seq_parallel.shard_batch
        print(f"[cpmjax train] sequence parallel over {seq_parallel.num_shards} devices "
              f"(attention {seq_parallel.impl}, layout {seq_parallel.layout}), mesh "
              f"{dict(mesh.shape)}", file=sys.stderr)
    else:
        data_sharding = batch_sharding(mesh) if mesh is not None else None
        to_device = functools.partial(_to_device, sharding=data_sharding)

    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), keep=run.keep_checkpoints,
                        async_save=run.async_checkpointing)
    rng_key = jax.random.key(run.seed)
    start_step, tokens_seen = 0, 0
    if run.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start_step = int(meta["step"])
        tokens_seen = int(meta.get("tokens_seen", 0))
        batches.restore(meta["data"])
        rng_key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        print(f"[cpmjax train] resumed from step {start_step} ({ckpt.directory})",
              file=sys.stderr)
    out_shardings = None
    if mesh is not None:
        state, state_shardings = _pin_to_mesh(state, mesh)
        out_shardings = (state_shardings, None)
    step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)
    eval_fn = jax.jit(eval_step)

    mc = model.config
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_tok = flops_per_token(mc, config.data.seq_len)
    peak = measure_matmul_peak()
    log = MetricsLog(run.out_dir, tensorboard=run.tensorboard)
    bar = None
    if run.progress:
        from tqdm import tqdm

        bar = tqdm(total=run.steps, initial=start_step, desc="train", dynamic_ncols=True,
                   file=sys.stderr)

    def meta_for(step: int) -> dict[str, Any]:
        return {"data": batches.state(), "rng": np.asarray(jax.random.key_data(rng_key)).tolist(),
                "tokens_seen": tokens_seen, "config": config.model_dump(mode="json")}

    def evaluate(state) -> float | None:
        if not eval_batches:
            return None
        total, count = 0.0, 0.0
        for b in eval_batches:
            loss, n = eval_fn(state, to_device(b))
            total += float(loss) * float(n)
            count += float(n)
        return total / max(count, 1.0)

    losses: list[float] = []
    last_save_time = time.time()
    t_start = time.time()
    window_t, window_tokens = time.perf_counter(), 0
    step = start_step
    eval_loss = None
    stopped_early = False
    try:
        while step < run.steps:
            batch = to_device(next(batches))
            lr = float(schedule(step))
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])
            step += 1
            rng_key = jax.random.fold_in(rng_key, step)
            param_norm = float(metrics["param_norm"])
            if not (math.isfinite(loss) and math.isfinite(param_norm)):
                ckpt.wait()
                what = (f"loss became {loss}" if not math.isfinite(loss)
                        else f"parameters became non-finite (norm {param_norm})")
                raise NonFiniteLossError(
                    f"{what} at step {step} (lr {lr:.3g}); stopping. The last good "
                    f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}"
                )
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            losses.append(loss)
            record = {"step": step, "loss": loss, "lr": lr,
                      "grad_norm": float(metrics["grad_norm"]), "param_norm": param_norm,
                      "accuracy": float(metrics["accuracy"]), "tokens_seen": tokens_seen}
            if step % run.log_every == 0 or step == run.steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                peak = max(peak, measure_matmul_peak(repeats=3))
                window_t, window_tokens = time.perf_counter(), 0
                record.update(tokens_per_sec=tps, mfu=tps * flops_tok / peak, peak_flops=peak,
                              elapsed_min=(time.time() - t_start) / 60)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}",
                                    mfu=f"{100 * tps * flops_tok / peak:.1f}%")
            if run.eval_every and step % run.eval_every == 0:
                eval_loss = evaluate(state)
                record["eval_loss"] = eval_loss
            log.write(record)
            if bar is not None:
                bar.update(1)
            out_of_time = (run.max_minutes is not None
                           and time.time() - t_start > run.max_minutes * 60)
            due = (run.checkpoint_every and step % run.checkpoint_every == 0) or (
                run.checkpoint_minutes is not None
                and time.time() - last_save_time > run.checkpoint_minutes * 60)
            if due or step == run.steps or out_of_time:
                ckpt.save(step, state, meta_for(step))
                last_save_time = time.time()
            if out_of_time and step < run.steps:
                stopped_early = True
                break
            if run.throttle_seconds:
                time.sleep(run.throttle_seconds)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        log.close()

    if not stopped_early:
        eval_loss = evaluate(state)
        if eval_loss is not None:
            with open(os.path.join(run.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "final_eval_loss": eval_loss}) + "\n")
    nnx.update((model, optimizer), state)
    export_dir = None
    if export and not stopped_early:
        export_dir = export_model(config, model, tokenizer)
    return TrainResult(step=step, losses=losses, final_loss=losses[-1] if losses else None,
                       eval_loss=eval_loss, tokens_seen=tokens_seen, export_dir=export_dir,
                       stopped_early=stopped_early)


def export_model(config: TrainConfig, model: CausalLM, tokenizer: Any,
                 out_dir: str | None = None) -> str:
    """Write the model in the HF layout (``cpmjax.save_pretrained``, ``run.export_dtype``) with
    its tokenizer; with a delta attached, the delta is saved instead (``<out>/delta``)."""
    from cpmjax.hf import save_pretrained
    from cpmjax.train.tokenizer import save_tokenizer

    out_dir = out_dir or config.export_dir
    if config.delta.method:
        import cpmjax.delta as delta_lib

        path = delta_lib.get(model).save(os.path.join(out_dir, "delta"))
        return os.path.dirname(path) if os.path.isfile(path) else path
    save_pretrained(model, out_dir, dtype=config.run.export_dtype)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def export_checkpoint(config: TrainConfig, step: int | None = None,
                      out_dir: str | None = None) -> str:
    """Export the checkpoint at ``step`` (default: latest) of ``config``'s run to the HF
    layout."""
    from cpmjax.train.tokenizer import load_training_tokenizer

    tok_dir = config.data.tokenizer or os.path.join(config.run.out_dir, "tokenizer")
    tokenizer = load_training_tokenizer(tok_dir)
    model = build_model(config, len(tokenizer))
    wrt = trainable_filter(config, model)
    optimizer = nnx.Optimizer(model, make_optimizer(config, model), wrt=wrt)
    _, state = nnx.split((model, optimizer))
    with Checkpointer(os.path.join(config.run.out_dir, "checkpoints"), create=False) as ckpt:
        state, _ = ckpt.restore(state, step)
    nnx.update((model, optimizer), state)
    return export_model(config, model, tokenizer, out_dir)
