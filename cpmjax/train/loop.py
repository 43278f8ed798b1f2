"""The training loop: data → jitted (optionally sharded) train step → optax → orbax checkpoints,
with a progress bar, JSON-lines metrics (and TensorBoard when ``tensorboardX`` is installed).

``train(config)`` is what ``cpmjax train`` runs; ``export_checkpoint(config, step)`` writes a
saved step in the HF layout. The pieces live beside it and are usable on their own:

- ``cpmjax.train.setup``: model, optimizer and schedule, mesh, tokenizer and batches;
- ``cpmjax.train.step``: the pure train/eval steps, ``SequenceParallel``, batch placement;
- ``cpmjax.train.metrics``: JSON lines / TensorBoard, progress bar, tokens/s and MFU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from cpmjax.distributed import is_primary, process_count, sync
from cpmjax.errors import NonFiniteLossError
from cpmjax.models import CausalLM
from cpmjax.train.checkpoint import Checkpointer
from cpmjax.train.config import TrainConfig, dump_config
from cpmjax.train.data import process_rows
from cpmjax.train.distill import Distill, check_teacher
from cpmjax.train.metrics import (
    METRICS_FILE,
    MetricsLog,
    Throughput,
    append_record,
    flops_per_token,
    measure_matmul_peak,
    progress_bar,
)
from cpmjax.train.setup import (
    build_model,
    calibration_ids,
    make_batches,
    make_optimizer,
    make_schedule,
    make_training_mesh,
    marker_token_id,
    model_config_from,
    mup_initialize,
    prepare_data,
    prepare_student,
    trainable_filter,
)
from cpmjax.train.step import (
    SequenceParallel,
    loss_fn,
    make_eval_step,
    make_train_step,
    pin_to_mesh,
    to_device,
)

# what this module offered before the split into setup / step / metrics stays importable here
__all__ = [
    "SequenceParallel",
    "TrainResult",
    "build_model",
    "export_checkpoint",
    "export_model",
    "flops_per_token",
    "loss_fn",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "make_training_mesh",
    "marker_token_id",
    "measure_matmul_peak",
    "model_config_from",
    "mup_initialize",
    "prepare_data",
    "train",
    "trainable_filter",
]


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the last step, the losses of the steps this call ran, the final
    training and held-out losses, tokens seen, where the model was exported, and whether the
    run stopped early on ``run.max_minutes``."""

    step: int
    losses: list[float]
    final_loss: float | None
    eval_loss: float | None
    tokens_seen: int
    export_dir: str | None
    stopped_early: bool = False


def train(config: TrainConfig, *, export: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns the losses of the steps
    this call ran. A NaN/inf loss raises ``NonFiniteLossError`` before anything is saved, so
    the last good checkpoint stays the latest.

    As one of several processes (``cpmjax.distributed.initialize`` first): every process runs
    this with the same config; each reads only its rows of every global batch, the checkpoints
    are written by all together, and process 0 alone writes logs, metrics and the export."""
    from sharding.mesh import batch_sharding, shard_model

    run = config.run
    primary = is_primary()
    mesh, seq_parallel = make_training_mesh(config)  # validate before any data work
    if config.delta.train_inherit is not None and not os.path.isdir(config.delta.inherit):
        if primary:
            print(f"[cpmjax train] CPET stage 1: training the delta to inherit into "
                  f"{config.delta.inherit}", file=sys.stderr)
        train(inherit_stage_config(config), export=True)
    os.makedirs(run.out_dir, exist_ok=True)
    if primary:
        dump_config(config, os.path.join(run.out_dir, "config.yaml"))
    # process 0 trains the tokenizer and tokenizes first; the others then find the cache (on a
    # shared filesystem) or build the same files themselves
    if primary:
        tokenizer, train_tokens, eval_tokens = prepare_data(config)
    sync("cpmjax.train.prepare_data")
    if not primary:
        tokenizer, train_tokens, eval_tokens = prepare_data(config)
    data_sharding = None
    if mesh is not None:
        data_sharding = batch_sharding(mesh, sequence=seq_parallel is not None)
    global_rows = config.data.batch_size
    rows = None
    if process_count() > 1:
        rows = process_rows(data_sharding, (global_rows, config.data.seq_len))
    batches, eval_batches = make_batches(config, tokenizer, train_tokens, eval_tokens, rows)

    model = build_model(config, len(tokenizer))
    calibration = None
    if config.compress.active:
        calibration = calibration_ids(config, tokenizer, train_tokens)
    wrt, teacher = prepare_student(config, model, calibration)
    if mesh is not None:
        shard_model(model, mesh)
    optimizer = nnx.Optimizer(model, make_optimizer(config, model), wrt=wrt)
    graphdef, state = nnx.split((model, optimizer))
    schedule = make_schedule(config)
    distill, teacher_state = None, None
    if teacher is not None:
        if mesh is not None:
            shard_model(teacher, mesh)
        teacher_graphdef, teacher_state = nnx.split(teacher)
        distill = Distill(teacher_graphdef, config.distill.hidden_weight,
                          check_teacher(config, model, teacher))
        if primary:
            print(f"[cpmjax train] distilling layers {list(distill.layers)} of "
                  f"{config.distill.teacher} (weight {distill.weight:g})", file=sys.stderr)
    train_step = make_train_step(graphdef, wrt, run.loss_chunk, run.loss_remat, distill)
    eval_step = make_eval_step(graphdef, run.loss_chunk)
    if seq_parallel is not None:
        train_step, eval_step = seq_parallel.wrap(train_step), seq_parallel.wrap(eval_step)
        to_device_fn = functools.partial(seq_parallel.shard_batch, global_rows=global_rows)
        if primary:
            print(f"[cpmjax train] sequence parallel over {seq_parallel.num_shards} devices "
                  f"(attention {seq_parallel.impl}, layout {seq_parallel.layout}), mesh "
                  f"{dict(mesh.shape)}", file=sys.stderr)
    else:
        to_device_fn = functools.partial(to_device, sharding=data_sharding,
                                         global_rows=global_rows)

    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), keep=run.keep_checkpoints,
                        async_save=run.async_checkpointing)
    out_shardings = None
    if mesh is not None:
        # before a restore: the restored state takes the template's shardings, so every leaf
        # (optimizer counters too) lands on the mesh, never on one process's device
        state, state_shardings = pin_to_mesh(state, mesh)
        out_shardings = (state_shardings, None)
    rng_key = jax.random.key(run.seed)
    start_step, tokens_seen = 0, 0
    if run.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start_step = int(meta["step"])
        tokens_seen = int(meta.get("tokens_seen", 0))
        batches.restore(meta["data"])
        rng_key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        if primary:
            print(f"[cpmjax train] resumed from step {start_step} ({ckpt.directory})",
                  file=sys.stderr)
    step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)
    if distill is not None:
        step_fn = functools.partial(step_fn, teacher_state=teacher_state)
    eval_fn = jax.jit(eval_step)

    mc = model.config
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_tok = flops_per_token(mc, config.data.seq_len)
    throughput = Throughput(flops_tok)
    log = MetricsLog(run.out_dir, tensorboard=run.tensorboard) if primary else None
    bar = progress_bar(run.steps, start_step) if run.progress and primary else None

    def meta_for(step: int) -> dict[str, Any]:
        return {"data": batches.state(), "rng": np.asarray(jax.random.key_data(rng_key)).tolist(),
                "tokens_seen": tokens_seen, "config": config.model_dump(mode="json")}

    def evaluate(state) -> float | None:
        if not eval_batches:
            return None
        total, count = 0.0, 0.0
        for b in eval_batches:
            loss, n = eval_fn(state, to_device_fn(b))
            total += float(loss) * float(n)
            count += float(n)
        return total / max(count, 1.0)

    losses: list[float] = []
    last_save_time = time.time()
    t_start = time.time()
    throughput.start()
    step = start_step
    eval_loss = None
    stopped_early = False
    try:
        while step < run.steps:
            batch = to_device_fn(next(batches))
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
            throughput.add(tokens_per_step)
            losses.append(loss)
            record = {"step": step, "loss": loss, "lr": lr,
                      "grad_norm": float(metrics["grad_norm"]), "param_norm": param_norm,
                      "accuracy": float(metrics["accuracy"]), "tokens_seen": tokens_seen}
            for extra in ("ce", "hidden_mse"):  # with distillation
                if extra in metrics:
                    record[extra] = float(metrics[extra])
            if step % run.log_every == 0 or step == run.steps:
                record.update(**throughput.report(), elapsed_min=(time.time() - t_start) / 60)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{record['tokens_per_sec']:.0f}",
                                    mfu=f"{100 * record['mfu']:.1f}%")
            if run.eval_every and step % run.eval_every == 0:
                eval_loss = evaluate(state)
                record["eval_loss"] = eval_loss
            if log is not None:
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
        if log is not None:
            log.close()

    if not stopped_early:
        eval_loss = evaluate(state)
        if eval_loss is not None and primary:
            append_record(os.path.join(run.out_dir, METRICS_FILE),
                          {"step": step, "final_eval_loss": eval_loss})
    nnx.update((model, optimizer), state)
    export_dir = None
    if export and not stopped_early:
        export_dir = export_model(config, model, tokenizer)
        sync("cpmjax.train.export")
    return TrainResult(step=step, losses=losses, final_loss=losses[-1] if losses else None,
                       eval_loss=eval_loss, tokens_seen=tokens_seen, export_dir=export_dir,
                       stopped_early=stopped_early)


def inherit_stage_config(config: TrainConfig) -> TrainConfig:
    """The config of CPET's first stage (``delta.train_inherit``): the same model, data and
    optimizer, no compression or distillation, the stage's delta, ``<out_dir>/inherit``, and
    an export whose ``delta`` directory is ``delta.inherit``."""
    t = config.delta.train_inherit
    tree = config.model_dump()
    tree["compress"], tree["distill"] = {}, {}
    tree["delta"] = {"method": t.method, "targets": t.targets, "hparams": dict(t.hparams)}
    tree["optim"].update(decay_start=None, decay_steps=None)
    tree["data"]["cache_dir"] = config.cache_dir
    tree["run"].update(steps=t.steps, out_dir=os.path.join(config.run.out_dir, "inherit"),
                       export_dir=os.path.dirname(os.path.normpath(config.delta.inherit)))
    return TrainConfig(**tree)


def export_model(config: TrainConfig, model: CausalLM, tokenizer: Any,
                 out_dir: str | None = None) -> str:
    """Write the model in the HF layout (``cpmjax.save_pretrained``, ``run.export_dtype``) with
    its tokenizer; with a delta attached, the delta is saved instead (``<out>/delta``; other
    named deltas, e.g. CPET's ``recovery`` beside an inherited one, to ``<out>/delta-<name>``);
    a quantized model without deltas is saved with ``cpmjax.compress.save_quantized``.
    Several processes: every process calls it (the parameters are gathered across them),
    process 0 alone writes."""
    from cpmjax.hf import save_pretrained
    from cpmjax.train.tokenizer import save_tokenizer

    out_dir = out_dir or config.export_dir
    if process_count() > 1:
        gather_to_hosts(model)
        if not is_primary():
            return (os.path.join(out_dir, "delta") if config.delta.method or config.delta.inherit
                    else out_dir)
    if config.delta.method or config.delta.inherit:
        import cpmjax.delta as delta_lib

        saved = []
        for name in delta_lib.names(model):
            where = os.path.join(out_dir, "delta" if name == "default" else f"delta-{name}")
            path = delta_lib.get(model, name).save(where)
            saved.append(os.path.dirname(path) if os.path.isfile(path) else path)
        # one delta: its directory; several (inherited + recovery): the directory holding them
        return saved[0] if len(saved) == 1 else out_dir
    if config.compress.quantize is not None:
        from cpmjax.compress import save_quantized

        save_quantized(model, out_dir)
        save_tokenizer(tokenizer, out_dir)
        return out_dir
    save_pretrained(model, out_dir, dtype=config.run.export_dtype)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def gather_to_hosts(model: CausalLM) -> None:
    """Replace every array of ``model`` that spans several processes by its full value (a
    numpy array in every process): a collective, every process must call it."""
    from jax.experimental import multihost_utils

    state = nnx.state(model)
    gathered = jax.tree.map(
        lambda x: (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                   if isinstance(x, jax.Array) and not x.is_fully_addressable else x), state)
    nnx.update(model, gathered)


def export_checkpoint(config: TrainConfig, step: int | None = None,
                      out_dir: str | None = None) -> str:
    """Export the checkpoint at ``step`` (default: latest) of ``config``'s run to the HF
    layout."""
    from cpmjax.train.tokenizer import load_training_tokenizer

    tok_dir = config.data.tokenizer or os.path.join(config.run.out_dir, "tokenizer")
    tokenizer = load_training_tokenizer(tok_dir)
    model = build_model(config, len(tokenizer))
    calibration = None
    if config.compress.active:
        _, train_tokens, _ = prepare_data(config)
        calibration = calibration_ids(config, tokenizer, train_tokens)
    wrt, _ = prepare_student(config, model, calibration)
    optimizer = nnx.Optimizer(model, make_optimizer(config, model), wrt=wrt)
    _, state = nnx.split((model, optimizer))
    with Checkpointer(os.path.join(config.run.out_dir, "checkpoints"), create=False) as ckpt:
        state, _ = ckpt.restore(state, step)
    nnx.update((model, optimizer), state)
    return export_model(config, model, tokenizer, out_dir)
