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
    """Memory read bandwidth in bytes/s: the best of ``repeats`` jitted ``sum`` over a float32
    array of ``size_bytes`` (a read-only stream, what a decode step does with its weights).
    The best, not the median, keeps a roofline built on it conservative (higher)."""
    import jax.numpy as jnp

    x = jnp.ones((size_bytes // 4,), jnp.float32)
    read = jax.jit(jnp.sum)
    jax.block_until_ready(read(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(read(x))
        best = min(best, time.perf_counter() - start)
    return size_bytes / best
