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


# ----------------------------------------------------------------------------------------------
# structured: whole MLP neurons
def _swiglu_mlps(model: nnx.Module) -> list[tuple[str, Any]]:
    return [(p, m) for p, m, _, _ in modules(model)
            if ".layers." in f".{p}" and p.endswith(".mlp")
            and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))]


def neuron_scores(mlp: Any, activation_norm: jax.Array | None = None) -> jax.Array:
    """Importance ``[inter]`` of each intermediate neuron of a SwiGLU MLP: the product of the
    norms of its weights (its column of ``gate_proj`` and ``up_proj``, its row of ``down_proj``)
    for magnitude; Wanda's ``||h_j||_2 * ||W_down[j, :]||_2`` (``h_j`` the neuron's activation
    over the calibration tokens) when ``activation_norm [inter]`` is given."""
    def norms(w: jax.Array, axis: int) -> jax.Array:
        return jnp.linalg.norm(w.astype(jnp.float32), axis=axis)

    down = norms(mlp.down_proj.kernel[...], 1)
    if activation_norm is not None:
        return activation_norm * down
    return norms(mlp.gate_proj.kernel[...], 0) * norms(mlp.up_proj.kernel[...], 0) * down


def prune_neurons(model: nnx.Module, sparsity: float = 0.5, criterion: str = "magnitude",
                  calibration: Any = None) -> dict[str, int]:
    """Structured pruning: remove ``round(sparsity * inter)`` whole intermediate neurons of every
    dense SwiGLU MLP of the decoder (the lowest ``neuron_scores``), in place.

    A removed neuron's column of ``gate_proj`` / ``up_proj`` and row of ``down_proj`` are zeroed
    and masked (``PruneMask``, kept by ``apply_masks``), so the MLP computes exactly what the MLP
    sliced to the kept neurons computes, and deltas still fit the unchanged shapes (slicing the
    weights for the speed-up is left to export). ``criterion`` ``"magnitude"`` or ``"wanda"``
    (needs ``calibration`` token ids). Returns the number of neurons removed per MLP path."""
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise CompressionError(f"sparsity must be in (0, 1), got {sparsity!r}")
    if criterion not in CRITERIA:
        raise CompressionError(f"criterion {criterion!r}: choose from {list(CRITERIA)}")
    targets = _swiglu_mlps(model)
    if not targets:
        raise CompressionError(f"{type(model).__name__} has no dense SwiGLU MLP in its decoder "
                               "to prune neurons of (MoE layers are not supported)")
    for path, mlp in targets:
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(getattr(mlp, name), "kernel", None), nnx.Param):
                raise CompressionError(f"{path}.{name} has no float kernel (already quantized?):"
                                       " prune before quantizing")
    norms: dict[str, jax.Array] = {}
    if criterion == "wanda":
        config = getattr(model, "config", None)
        batches = calibration_batches(calibration, getattr(config, "vocab_size", None))
        downs = {f"{p}.down_proj": m.down_proj for p, m in targets}
        norms = {p: jnp.sqrt(s) for p, s in capture(model, downs, batches, sum_squares).items()}
    removed = {}
    for path, mlp in targets:
        scores = neuron_scores(mlp, norms.get(f"{path}.down_proj"))
        inter = scores.shape[0]
        k = int(round(float(sparsity) * inter))
        order = jnp.argsort(scores, stable=True)
        keep = jnp.ones((inter,), bool).at[order[:k]].set(False)
        for name, mask in (("gate_proj", keep[None, :]), ("up_proj", keep[None, :]),
                           ("down_proj", keep[:, None])):
            layer = getattr(mlp, name)
            w = layer.kernel[...]
            full = jnp.broadcast_to(mask, w.shape)
            old = getattr(layer, "prune_mask", None)
            if isinstance(old, PruneMask):
                full = full & old[...]
            layer.prune_mask = PruneMask(full)
            layer.kernel.set_value(jnp.where(full, w, jnp.zeros((), w.dtype)))
            if name != "down_proj" and getattr(layer, "bias", None) is not None:
                layer.bias.set_value(jnp.where(keep, layer.bias[...], 0))
        removed[path] = k
    record(model, "prune_neurons", sparsity=float(sparsity), criterion=criterion,
           modules=len(targets))
    return removed
