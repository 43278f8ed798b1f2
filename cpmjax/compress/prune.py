"""Pruning the decoder's linear weights: unstructured or N:M (2:4), by magnitude or by Wanda.

Scores: ``|W|`` (magnitude) or ``|W| * ||X||_2`` per input channel (Wanda, from calibration
activations). Kernels are ``[in, out]``; each output channel is pruned on its own (the Wanda
grouping): unstructured removes exactly ``round(sparsity * in)`` weights from every output
column; ``N:M`` keeps the ``N`` best of every ``M`` consecutive input weights of each column.

The mask stays on the module as ``prune_mask`` (a ``PruneMask`` variable, not a parameter), so
optimizers never see it. Pruned weights stay zero under delta tuning (the backbone is frozen);
for full fine-tuning call ``apply_masks(model)`` after every optimizer update.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax.compress._common import (
    DEFAULT_EXCLUDE,
    calibration_batches,
    capture,
    decoder_linears,
    modules,
    record,
    sum_squares,
)
from cpmjax.errors import CompressionError

CRITERIA = ("magnitude", "wanda")


class PruneMask(nnx.Variable):
    """Which kernel entries survive pruning (``True`` = kept), shaped like the kernel."""


def _pattern(pattern: str, sparsity: float) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise CompressionError(f"pattern {pattern!r}: use 'unstructured' or 'N:M' with "
                               "0 < N < M, e.g. '2:4'")
    n, mm = int(m.group(1)), int(m.group(2))
    if abs(sparsity - (1 - n / mm)) > 1e-9:
        raise CompressionError(f"pattern {pattern!r} prunes {1 - n / mm:g} of the weights; "
                               f"sparsity={sparsity:g} contradicts it")
    return n, mm


def mask_from_scores(scores: jax.Array, sparsity: float, nm: tuple[int, int] | None
                     ) -> jax.Array:
    """Boolean keep-mask ``[in, out]`` from scores ``[in, out]`` (per output column)."""
    d_in, d_out = scores.shape
    if nm is None:
        k = int(round(sparsity * d_in))
        ranks = jnp.argsort(jnp.argsort(scores, axis=0, stable=True), axis=0, stable=True)
        return ranks >= k
    n, m = nm
    grouped = scores.reshape(d_in // m, m, d_out)
    ranks = jnp.argsort(jnp.argsort(grouped, axis=1, stable=True), axis=1, stable=True)
    return (ranks >= m - n).reshape(d_in, d_out)


def prune(
    model: nnx.Module,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    criterion: str = "magnitude",
    calibration: Any = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, float]:
    """Prune every decoder linear kernel ``[in, out]`` of ``model`` in place.

    ``sparsity`` in (0, 1); ``pattern`` ``"unstructured"`` or ``"N:M"`` (``"2:4"``: sparsity
    must be 0.5); ``criterion`` ``"magnitude"`` or ``"wanda"`` (needs ``calibration``: token
    ids ``[batch, seq]`` or a list of them); ``exclude``: regular expressions over module paths
    (default: embeddings and head, which are never decoder linears anyway). Arguments are
    checked, and every kernel's shape against the pattern, before any compute. Returns the
    achieved sparsity per module path."""
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise CompressionError(f"sparsity must be in (0, 1), got {sparsity!r}")
    sparsity = float(sparsity)
    if criterion not in CRITERIA:
        raise CompressionError(f"criterion {criterion!r}: choose from {list(CRITERIA)}")
    nm = _pattern(pattern, sparsity)
    targets = decoder_linears(model, exclude)
    if not targets:
        raise CompressionError(f"no linear module of {type(model).__name__} to prune "
                               f"(exclude={list(exclude)})")
    for path, module, _, _ in targets:
        if not isinstance(module.kernel, nnx.Param):
            raise CompressionError(f"{path} has no float kernel (already quantized?): prune "
                                   "before quantizing")
        d_in = module.kernel.shape[0]
        if nm is not None and d_in % nm[1]:
            raise CompressionError(f"pattern {pattern!r} needs the input dimension of {path} "
                                   f"divisible by {nm[1]}; its kernel is {module.kernel.shape}")
    batches = None
    if criterion == "wanda":
        config = getattr(model, "config", None)
        batches = calibration_batches(calibration, getattr(config, "vocab_size", None))
    norms: dict[str, jax.Array] = {}
    if batches is not None:
        norms = {p: jnp.sqrt(s) for p, s in capture(
            model, {p: m for p, m, _, _ in targets}, batches, sum_squares).items()}
    achieved = {}
    for path, module, _, _ in targets:
        w = module.kernel[...]
        scores = jnp.abs(w.astype(jnp.float32))
        if path in norms:
            scores = scores * norms[path][:, None]
        keep = mask_from_scores(scores, sparsity, nm)
        old = getattr(module, "prune_mask", None)
        if isinstance(old, PruneMask):
            keep = keep & old[...]
        module.prune_mask = PruneMask(keep)
        module.kernel.set_value(jnp.where(keep, w, jnp.zeros((), w.dtype)))
        achieved[path] = float(1.0 - jnp.mean(keep))
    record(model, "prune", sparsity=sparsity, pattern=pattern, criterion=criterion,
           exclude=list(exclude), modules=len(targets))
    return achieved


def masks(model: nnx.Module) -> dict[str, jax.Array]:
    """The pruning masks of ``model`` by module path."""
    return {p: m.prune_mask[...] for p, m, _, _ in modules(model)
            if isinstance(getattr(m, "prune_mask", None), PruneMask)}


def apply_masks(model: nnx.Module) -> int:
    """Zero the pruned weights again (after a full fine-tuning update, which may have revived
    them); works inside ``nnx.jit``. Kernels that are not parameters (quantized kernels are
    read-only and never updated) are skipped. Returns how many kernels were masked."""
    n = 0
    for _, m, _, _ in modules(model):
        mask = getattr(m, "prune_mask", None)
        if isinstance(mask, PruneMask) and isinstance(getattr(m, "kernel", None), nnx.Param):
            w = m.kernel[...]
            m.kernel.set_value(jnp.where(mask[...], w, jnp.zeros((), w.dtype)))
            n += 1
    return n
