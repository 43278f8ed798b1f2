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
