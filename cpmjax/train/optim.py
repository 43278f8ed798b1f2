"""The optimizer: AdamW (β 0.9/0.95) with weight decay, global-norm clipping and μP learning-rate
groups, built from optax pieces.

μP as in MiniCPM's wind tunnel: the weight matrices inside the transformer blocks (attention
and MLP projections, MoE experts) train at ``lr / width_scale`` with ``width_scale =
hidden_size / dim_model_base``; embeddings, norms, biases and the LM head train at ``lr``.
Groups are decided by parameter path (``mup_group``). Weight decay is decoupled and scaled by
the same per-group rate (as torch's AdamW does per param group); it applies to matrices and
embeddings, not to norms and biases.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MATRIX = "matrix"  # inside a block, ndim >= 2: lr / width_scale
BASE = "base"  # embeddings, norms, biases, head: lr


def _keys(path: tuple[Any, ...]) -> list[str]:
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
        else:
            out.append(str(entry))
    return out


def mup_group(path: tuple[Any, ...] | str, ndim: int) -> str:
    """``"matrix"`` for a parameter of ``ndim >= 2`` inside the decoder blocks (a path through
    ``layers``), else ``"base"``. ``path``: a pytree key path, a tuple of names, or a dotted
    string."""
    names = path.split(".") if isinstance(path, str) else _keys(path)
    if "layers" in names and ndim >= 2:
        return MATRIX
    return BASE


def mup_labels(params: Any) -> Any:
    """The group name of every leaf of ``params`` (same tree structure)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: mup_group(p, jnp.ndim(x)), params)


class _Empty(NamedTuple):
    pass


def scale_by_mup(width_scale: float) -> optax.GradientTransformation:
    """Multiply the updates of ``"matrix"`` parameters by ``1 / width_scale`` (stateless)."""
    factor = 1.0 / float(width_scale)

    def init(params):
        del params
        return _Empty()

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: u * factor if mup_group(p, jnp.ndim(u)) == MATRIX else u, updates
        )
        return scaled, state

    return optax.GradientTransformation(init, update)


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, params)


def adamw_mup(
    schedule: optax.Schedule | float,
    *,
    width_scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with μP groups. Update of a parameter ``p`` in group g with rate ``lr_t``::

        u = adam(clip(grad)) + weight_decay * p   (decay only for ndim >= 2)
        p <- p - lr_t * u * (1 / width_scale if g == "matrix" else 1)
    """
    # The chain has the same structure for every setting (clip_norm=None clips at infinity,
    # weight_decay=0 adds nothing, width_scale=1 scales by 1), so a checkpoint resumes under
    # changed hyper-parameters.
    return optax.chain(
        optax.clip_by_global_norm(float("inf") if not clip_norm else clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=_decay_mask),
        optax.scale_by_learning_rate(schedule),
        scale_by_mup(width_scale),
    )
