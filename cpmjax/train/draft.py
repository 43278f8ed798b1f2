"""Training a small module against a frozen model: an EAGLE draft fitted to its target's hidden
states (``cpmjax.generate.eagle.train_draft`` calls this with the draft's loss).

It is the training recipe's pieces, not a second copy of them: the optimizer is
``adamw_mup`` (β 0.9/0.999, no weight decay, global-norm clipping at 1, no μP groups), the rate
follows ``cosine_schedule`` (linear warmup, cosine decay to 10% at the last step), checkpoints
are the recipe's ``Checkpointer`` (orbax; resumable, the last two kept) and metrics go through
``MetricsLog`` (``<log_dir>/metrics.jsonl``, TensorBoard when installed).

    history = train_against(draft, target, batches, loss=draft_loss, steps=1000,
                            loss_kwargs={"token_weight": 0.1, "noise": 0.0})

The loss is ``loss(module, frozen, batch, key=key, **loss_kwargs) -> (loss, metrics)``; only
``module``'s ``nnx.Param`` are trained.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpmjax.errors import ConfigError
from cpmjax.train.checkpoint import Checkpointer
from cpmjax.train.metrics import MetricsLog
from cpmjax.train.optim import adamw_mup
from cpmjax.train.schedules import cosine_schedule

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

_TX: dict[tuple[float, int, int], optax.GradientTransformation] = {}


def draft_schedule(learning_rate: float, warmup: int, steps: int) -> optax.Schedule:
    """``cosine_schedule`` for a run of ``steps``: warmup over ``min(warmup, steps // 2)``
    steps (at least one), decay to 10% of ``learning_rate`` at ``max(steps, 2)``."""
    return cosine_schedule(learning_rate, max(1, min(warmup, steps // 2)), max(steps, 2),
                           min_ratio=0.1)


def draft_optimizer(learning_rate: float, warmup: int, steps: int
                    ) -> optax.GradientTransformation:
    """AdamW (β 0.9/0.999, no weight decay) with clipping at 1 on ``draft_schedule``. One
    object per setting, so that a second run with the same settings reuses the compiled
    step."""
    key = (float(learning_rate), int(warmup), int(steps))
    if key not in _TX:
        _TX[key] = adamw_mup(draft_schedule(learning_rate, warmup, steps), b1=0.9, b2=0.999,
                             eps=1e-8, weight_decay=0.0, clip_norm=1.0)
    return _TX[key]


@partial(nnx.jit, static_argnums=(5, 6))
def _train_step(module, optimizer, frozen, batch, key, loss, loss_kwargs):
    def objective(module):
        return loss(module, frozen, batch, key=key, **dict(loss_kwargs))

    (_, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(module)
    optimizer.update(module, grads)
    return metrics


def train_against(
    module: nnx.Module,
    frozen: nnx.Module,
    batches: Iterable[np.ndarray],
    *,
    loss: LossFn,
    loss_kwargs: Mapping[str, Any] | None = None,
    steps: int,
    learning_rate: float = 3e-4,
    warmup: int = 20,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 200,
    log_every: int = 20,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_dir: str | os.PathLike | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train ``module`` in place on ``loss`` against the frozen model ``frozen``.

    ``batches`` yields token-id arrays ``[batch, seq]``; step ``k`` (from 1) draws its noise key
    from ``PRNGKey(seed + start)`` split once per step. With ``checkpoint_dir`` the module and
    optimizer state are saved every ``checkpoint_every`` steps and at the end, and training
    resumes from the latest checkpoint found there. Stops after ``steps`` steps, after
    ``max_seconds``, or when ``batches`` ends. Logged steps (every ``log_every``, the first and
    the last) are returned as records ``{metric: value, "step": k}``, passed to ``log`` and, with
    ``log_dir``, written to ``<log_dir>/metrics.jsonl``."""
    if log_every < 1 or checkpoint_every < 1:
        raise ConfigError(f"log_every={log_every} and checkpoint_every={checkpoint_every} "
                          "must be >= 1")
    kwargs = tuple(sorted((loss_kwargs or {}).items()))
    optimizer = nnx.Optimizer(module, draft_optimizer(learning_rate, warmup, steps),
                              wrt=nnx.Param)
    ckpt = Checkpointer(checkpoint_dir, keep=2) if checkpoint_dir is not None else None
    metrics_log = None
    start = 0
    try:
        if ckpt is not None and ckpt.latest_step() is not None:
            state, meta = ckpt.restore(nnx.state((module, optimizer)))
            nnx.update((module, optimizer), state)
            start = int(meta["step"])
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            metrics_log = MetricsLog(os.fspath(log_dir))

        history: list[dict[str, float]] = []
        key = jax.random.PRNGKey(seed + start)
        t0 = time.perf_counter()
        batches = iter(batches)
        number = start
        for number in range(start + 1, steps + 1):
            batch = next(batches, None)
            if batch is None:  # the data ran out
                number -= 1
                break
            key, sub = jax.random.split(key)
            metrics = _train_step(module, optimizer, frozen, jnp.asarray(batch), sub, loss,
                                  kwargs)
            if number % log_every == 0 or number == steps or number == start + 1:
                record = {k: float(v) for k, v in metrics.items()}
                record["step"] = number
                history.append(record)
                if metrics_log is not None:
                    metrics_log.write(record)
                if log is not None:
                    log(number, record)
            if ckpt is not None and number % checkpoint_every == 0:
                ckpt.save(number, nnx.state((module, optimizer)), {})
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
        if ckpt is not None and number > start and number % checkpoint_every:
            ckpt.save(number, nnx.state((module, optimizer)), {})
    finally:
        if ckpt is not None:
            ckpt.close()
        if metrics_log is not None:
            metrics_log.close()
    return history
