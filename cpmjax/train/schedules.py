"""Learning-rate schedules: Warmup-Stable-Decay (MiniCPM) and cosine, as optax schedules.

WSD with peak ``lr``, ``warmup_steps`` W, decay start D and decay length T::

    step < W            lr * (step + 1) / W        (linear warmup, reaches lr at step W - 1)
    W <= step < D       lr                         (stable)
    D <= step           lr * f(step - D)           (decay)

with the decay form ``f``:

- ``"exp"`` (MiniCPM's): ``f(t) = max(0.5 ** (t / half_life), min_ratio)``;
- ``"linear"``: ``1 - (1 - min_ratio) * min(t / T, 1)``;
- ``"cosine"``: ``min_ratio + (1 - min_ratio) * (1 + cos(pi * min(t / T, 1))) / 2``.

The value depends only on the step, so a decay branches off any saved stable-phase checkpoint
("continuous training"): restore the checkpoint at step D, set ``decay_start = D`` and train
on; the stable run and its branches share everything before D.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from cpmjax.errors import ConfigError

DECAY_FORMS = ("exp", "linear", "cosine")


def wsd_schedule(
    lr: float,
    warmup_steps: int,
    decay_start: int | None,
    decay_steps: int = 0,
    *,
    decay: str = "exp",
    half_life: float | None = None,
    min_ratio: float = 0.0,
) -> optax.Schedule:
    """The WSD schedule (see the module docstring). ``decay_start=None`` never decays.

    For ``decay="exp"`` the half-life defaults to ``decay_steps / 8`` (the rate falls to about
    0.4% of its peak over the decay phase, which is MiniCPM's ~10% of tokens)."""
    if decay not in DECAY_FORMS:
        raise ConfigError(f"decay form {decay!r} is not one of {DECAY_FORMS}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ConfigError(f"warmup_steps={warmup_steps} and decay_steps={decay_steps} must be >= 0")
    if decay_start is not None and decay_start < warmup_steps:
        raise ConfigError(f"decay_start={decay_start} is before the end of warmup ({warmup_steps})")
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if decay == "exp":
        if half_life is None:
            half_life = max(decay_steps, 1) / 8.0
        if half_life <= 0:
            raise ConfigError(f"half_life must be > 0, got {half_life}")
    elif decay_start is not None and decay_steps <= 0:
        raise ConfigError(f"a {decay} decay needs decay_steps > 0")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1.0) / max(warmup_steps, 1)
        value = jnp.where(step < warmup_steps, warm, lr)
        if decay_start is None:
            return value
        t = jnp.maximum(step - decay_start, 0.0)
        if decay == "exp":
            factor = jnp.maximum(0.5 ** (t / half_life), min_ratio)
        else:
            frac = jnp.minimum(t / decay_steps, 1.0)
            if decay == "linear":
                factor = 1.0 - (1.0 - min_ratio) * frac
            else:
                factor = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(step >= decay_start, lr * factor, value)

    return schedule


def cosine_schedule(lr: float, warmup_steps: int, total_steps: int, *, min_ratio: float = 0.1
                    ) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_ratio`` at ``total_steps`` (the
    usual baseline WSD is compared against)."""
    if total_steps <= warmup_steps:
        raise ConfigError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1.0) / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cos = lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * frac)))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule
