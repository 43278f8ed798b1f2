"""Timing of compiled JAX calls, shared by the library's stats and the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1
                   ) -> float:
    """Median wall seconds of ``fn(*args)`` over ``repeats`` calls, each waited for with
    ``jax.block_until_ready``, after ``warmup`` untimed calls (compilation, first-call costs)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(size_bytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s for a roofline: the best over ``repeats`` of a jitted ``sum``
    (a read-only stream, what a decode step does with its weights) and a jitted copy ``x + 0``
    (read + write, counted as twice the size) of a float32 array of ``size_bytes``. XLA:CPU's
    reduction alone runs far below the memory's speed, hence the copy. The best, not the
    median, keeps a roofline built on it conservative (higher)."""
    import jax.numpy as jnp

    x = jnp.ones((size_bytes // 4,), jnp.float32)
    best_rate = 0.0
    for fn, moved in ((jax.jit(jnp.sum), size_bytes), (jax.jit(lambda a: a + 0.0),
                                                        2 * size_bytes)):
        jax.block_until_ready(fn(x))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            best_rate = max(best_rate, moved / (time.perf_counter() - start))
    return best_rate
