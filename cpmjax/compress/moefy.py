"""MoEfication: split each dense SwiGLU MLP into experts of its intermediate neurons and route.

Neurons (rows of the up projection, ``kernel.T [inter, hidden]``, normalised) are clustered into
``num_experts`` equal-sized groups by balanced k-means (numpy; each step assigns greedily by
distance under a capacity of ``inter / num_experts``). The weights are not moved: the layer
keeps its ``gate_proj`` / ``up_proj`` / ``down_proj`` (so deltas on them still fit) and an
``expert_of`` table ``[inter]``. A router (``nnx.Linear(hidden, num_experts)``) is fitted by
least squares on calibration tokens to predict each expert's activation norm; at run time the
``top_k`` experts with the largest predicted norm keep their neurons, the others are zeroed.
With ``top_k == num_experts`` every neuron is kept: the output equals the dense MLP's.
Computed densely (no speed-up on this path; the saving needs a gather kernel).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.compress._common import calibration_batches, capture, modules, record, set_child
from cpmjax.errors import CompressionError


class ExpertTable(nnx.Variable):
    """``expert_of [inter]``: the expert each intermediate neuron belongs to (int32)."""


class MoEfiedMLP(nnx.Module):
    """A dense SwiGLU MLP routed as ``num_experts`` experts, ``top_k`` active per token."""

    def __init__(self, mlp: nnx.Module, expert_of: np.ndarray, router_kernel: np.ndarray,
                 top_k: int):
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.num_experts = int(router_kernel.shape[1])
        self.top_k = int(top_k)
        self.expert_of = ExpertTable(jnp.asarray(expert_of, jnp.int32))
        self.router = nnx.Linear(router_kernel.shape[0], self.num_experts, use_bias=False,
                                 rngs=nnx.Rngs(0))
        self.router.kernel.set_value(jnp.asarray(router_kernel, jnp.float32))

    def expert_mask(self, x: jax.Array) -> jax.Array:
        """``[..., num_experts]`` 1.0 for the ``top_k`` routed experts of each token."""
        if self.top_k == self.num_experts:
            return jnp.ones((*x.shape[:-1], self.num_experts), x.dtype)
        scores = self.router(x.astype(jnp.float32))
        _, top = jax.lax.top_k(scores, self.top_k)
        return jnp.sum(jax.nn.one_hot(top, self.num_experts, dtype=x.dtype), axis=-2)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.top_k < self.num_experts:
            h = h * jnp.take(self.expert_mask(x), self.expert_of[...], axis=-1).astype(h.dtype)
        return self.down_proj(h)


def balanced_kmeans(points: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Cluster ``points [n, d]`` into ``k`` clusters of exactly ``n / k`` points; labels
    ``[n]``."""
    n = points.shape[0]
    cap = n // k
    rng = np.random.RandomState(seed)
    centers = points[rng.choice(n, k, replace=False)]
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        dist = ((points[:, None, :] - centers[None]) ** 2).sum(-1)  # [n, k]
        order = np.argsort(dist, axis=None, kind="stable")
        labels = np.full(n, -1)
        fill = np.zeros(k, np.int64)
        for flat in order:
            i, c = divmod(int(flat), k)
            if labels[i] < 0 and fill[c] < cap:
                labels[i], fill[c] = c, fill[c] + 1
        new = np.stack([points[labels == c].mean(0) for c in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    return labels


def _mlps(model: nnx.Module) -> list[tuple[str, Any, Any, Any]]:
    return [(p, m, parent, key) for p, m, parent, key in modules(model)
            if p.endswith(".mlp") and all(hasattr(m, n) for n in ("gate_proj", "up_proj",
                                                                  "down_proj"))
            and not isinstance(m, MoEfiedMLP)]


def moefy(model: nnx.Module, num_experts: int, top_k: int, calibration: Any = None, *,
          ridge: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Turn every dense MLP of ``model`` into a routed ``MoEfiedMLP`` in place.

    ``num_experts`` must divide the intermediate size; ``1 <= top_k <= num_experts``;
    ``calibration`` (token ids ``[batch, seq]`` or a list) trains the routers and is needed
    unless ``top_k == num_experts``. Returns, per MLP path, the router's recall of the truly
    most active ``top_k`` experts on the calibration tokens (1.0 at full top-k)."""
    for name, v in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CompressionError(f"{name} must be a positive int, got {v!r}")
    if top_k > num_experts:
        raise CompressionError(f"top_k={top_k} exceeds num_experts={num_experts}")
    targets = _mlps(model)
    if not targets:
        raise CompressionError(f"{type(model).__name__} has no dense SwiGLU MLP to MoEfy "
                               "(already MoE or MoEfied?)")
    for path, mlp, _, _ in targets:
        inter = mlp.up_proj.kernel.shape[1]
        if inter % num_experts:
            raise CompressionError(f"num_experts={num_experts} does not divide the "
                                   f"intermediate size {inter} of {path}")
    batches = None
    if top_k < num_experts:
        config = getattr(model, "config", None)
        batches = calibration_batches(calibration, getattr(config, "vocab_size", None))
    inputs: dict[str, Any] = {}
    if batches is not None:
        def keep(x: jax.Array, prev: Any) -> list:
            return [*(prev or []), np.asarray(x, np.float32).reshape(-1, x.shape[-1])]

        inputs = capture(model, {p: m for p, m, _, _ in targets}, batches, keep)
    recall = {}
    for path, mlp, parent, key in targets:
        up_proj = mlp.up_proj
        w = up_proj.dequantized() if hasattr(up_proj, "dequantized") else up_proj.kernel[...]
        up = np.asarray(w, np.float32).T  # [inter, hidden]
        up = up / (np.linalg.norm(up, axis=1, keepdims=True) + 1e-8)
        labels = balanced_kmeans(up, num_experts, seed=seed)
        hidden = up.shape[1]
        router = np.zeros((hidden, num_experts), np.float32)
        recall[path] = 1.0
        if path in inputs:
            x = np.concatenate(inputs[path])  # [tokens, hidden]
            xj = jnp.asarray(x)
            h = np.asarray(jax.nn.silu(mlp.gate_proj(xj)) * mlp.up_proj(xj), np.float32)
            norms = np.stack([np.linalg.norm(h[:, labels == c], axis=1)
                              for c in range(num_experts)], 1)  # [tokens, experts]
            router = np.linalg.solve(x.T @ x + ridge * np.eye(hidden), x.T @ norms
                                     ).astype(np.float32)
            truth = np.argsort(-norms, 1)[:, :top_k]
            pred = np.argsort(-(x @ router), 1)[:, :top_k]
            recall[path] = float(np.mean([len(set(a) & set(b)) / top_k
                                          for a, b in zip(truth, pred, strict=True)]))
        new = MoEfiedMLP(mlp, labels, router, top_k)
        set_child(parent, key, new)
    record(model, "moefy", num_experts=num_experts, top_k=top_k, modules=len(targets))
    return recall
