"""Bottleneck adapters: a down projection, a non-linearity and an up projection, with the up
projection zero at attach so the delta starts as the identity.

- ``adapter`` (Houlsby et al., 2019): sequential, ``y = h + up(act(down(h)))`` on the output ``h``
  of the target (after attention and after the MLP by default).
- ``parallel_adapter`` (He et al., 2022): ``y = base(x) + scale * up(act(down(x)))`` from the
  target's input.
- ``low_rank_adapter`` (Mahabadi et al., 2021): sequential adapter whose projections are products
  of two rank-``rank`` factors; bottleneck ``dim // reduction_factor``.
- ``compacter`` (Mahabadi et al., 2021): sequential adapter whose projections are parameterized
  hypercomplex multiplication (PHM) layers ``W = sum_i A_i kron (s_i @ t_i)`` with ``A [n, n, n]``
  shared by every compacter layer of the delta (``shared_phm_rule``), ``n =
  hypercomplex_division`` and low-rank ``s_i [in/n, phm_rank]``, ``t_i [phm_rank, out/n]``.

Shapes: inputs and outputs are ``[..., dim]``; projections ``[dim, bottleneck]`` and
``[bottleneck, dim]`` (``[in, out]`` like ``nnx.Linear``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax.delta._addressing import Entry, feature_dims
from cpmjax.delta._core import DeltaModule, DeltaParam, map_main
from cpmjax.errors import DeltaError

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}

ADAPTER_DEFAULTS: dict[str, Any] = {"bottleneck_dim": 24, "non_linearity": "gelu", "dim": None,
                                    "param_dtype": "float32"}
PARALLEL_DEFAULTS: dict[str, Any] = {"bottleneck_dim": 12, "non_linearity": "gelu", "scale": 1.0,
                                     "dim": None, "param_dtype": "float32"}
LOW_RANK_DEFAULTS: dict[str, Any] = {"reduction_factor": 32, "rank": 1, "non_linearity": "gelu",
                                     "dim": None, "param_dtype": "float32"}
COMPACTER_DEFAULTS: dict[str, Any] = {"reduction_factor": 16, "hypercomplex_division": 4,
                                      "phm_rank": 1, "shared_phm_rule": True,
                                      "non_linearity": "gelu", "dim": None,
                                      "param_dtype": "float32"}


class Dense(nnx.Module):
    """``x @ kernel + bias``, kernel ``[in, out]``."""

    def __init__(self, kernel: jax.Array, out_features: int, dtype: Any):
        self.kernel = DeltaParam(kernel.astype(dtype), logical_axes=(None, None))
        self.bias = DeltaParam(jnp.zeros((out_features,), dtype), logical_axes=(None,))

    def weight(self) -> jax.Array:
        return self.kernel[...]


class LowRank(nnx.Module):
    """``x @ (left @ right) + bias``, left ``[in, rank]``, right ``[rank, out]``."""

    def __init__(self, left: jax.Array, right: jax.Array, dtype: Any):
        self.left = DeltaParam(left.astype(dtype), logical_axes=(None, None))
        self.right = DeltaParam(right.astype(dtype), logical_axes=(None, None))
        self.bias = DeltaParam(jnp.zeros((right.shape[1],), dtype), logical_axes=(None,))

    def weight(self) -> jax.Array:
        return self.left[...] @ self.right[...]


class PHM(nnx.Module):
    """Parameterized hypercomplex multiplication: ``W = sum_i kron(A_i, s_i @ t_i)``,
    ``A [n, n, n]`` (the rule, possibly shared), ``s [n, in/n, r]``, ``t [n, r, out/n]``."""

    def __init__(self, rule: DeltaParam, s: jax.Array, t: jax.Array, dtype: Any):
        self.rule = rule
        self.s = DeltaParam(s.astype(dtype), logical_axes=(None, None, None))
        self.t = DeltaParam(t.astype(dtype), logical_axes=(None, None, None))
        n = s.shape[0]
        self.bias = DeltaParam(jnp.zeros((n * t.shape[2],), dtype), logical_axes=(None,))

    def weight(self) -> jax.Array:
        rule = self.rule[...]
        n = rule.shape[0]
        blocks = jnp.einsum("icr,ird->icd", self.s[...], self.t[...])  # [n, in/n, out/n]
        w = jnp.einsum("iab,icd->acbd", rule, blocks)  # [n, in/n, n, out/n]
        return w.reshape(n * blocks.shape[1], n * blocks.shape[2])


def phm_weight_reference(rule: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
    """``sum_i kron(rule[i], s[i] @ t[i])`` with ``jnp.kron`` (the definition, for tests)."""
    return sum(jnp.kron(rule[i], s[i] @ t[i]) for i in range(rule.shape[0]))


class Bottleneck(DeltaModule):
    """``up(act(down(h)))`` added to the target's output; ``h`` is the output (sequential) or the
    target's first argument (parallel)."""

    def __init__(self, method: str, down: nnx.Module, up: nnx.Module, non_linearity: str,
                 parallel: bool, scale: float = 1.0):
        if non_linearity not in ACTIVATIONS:
            raise DeltaError(
                f"unknown non_linearity {non_linearity!r}; choose from {sorted(ACTIVATIONS)}"
            )
        self.method = method
        self.down = down
        self.up = up
        self.non_linearity = non_linearity
        self.parallel = parallel
        self.scale = float(scale)

    def branch(self, h: jax.Array) -> jax.Array:
        dtype = h.dtype
        z = h @ self.down.weight().astype(dtype) + self.down.bias[...].astype(dtype)
        z = ACTIVATIONS[self.non_linearity](z)
        return z @ self.up.weight().astype(dtype) + self.up.bias[...].astype(dtype)

    def wrap(self, fn, args, kwargs):
        out = fn(*args, **kwargs)
        if self.parallel:
            x = args[0]
            return map_main(out, lambda y: y + (self.scale * self.branch(x)).astype(y.dtype))
        return map_main(out, lambda y: y + self.branch(y))


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def build_adapter(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs,
                  *, parallel: bool = False) -> list[tuple[str, DeltaModule]]:
    dtype = jnp.dtype(hp["param_dtype"])
    m = int(hp["bottleneck_dim"])
    out = []
    for entry in entries:
        d_in, d_out = feature_dims(model, entry, hp["dim"])
        if not parallel:
            d_in = d_out
        down = Dense(_normal(rngs, (d_in, m), d_in**-0.5), m, dtype)
        up = Dense(jnp.zeros((m, d_out)), d_out, dtype)
        method = "parallel_adapter" if parallel else "adapter"
        out.append((entry.path, Bottleneck(method, down, up, hp["non_linearity"], parallel,
                                           hp.get("scale", 1.0))))
    return out


def build_parallel(model, entries, hp, rngs):
    return build_adapter(model, entries, hp, rngs, parallel=True)


def build_low_rank(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
                   ) -> list[tuple[str, DeltaModule]]:
    dtype = jnp.dtype(hp["param_dtype"])
    rank = int(hp["rank"])
    out = []
    for entry in entries:
        _, d = feature_dims(model, entry, hp["dim"])
        m = max(1, d // int(hp["reduction_factor"]))
        down = LowRank(_normal(rngs, (d, rank), d**-0.5), _normal(rngs, (rank, m), rank**-0.5),
                       dtype)
        up = LowRank(_normal(rngs, (m, rank), m**-0.5), jnp.zeros((rank, d)), dtype)
        out.append((entry.path, Bottleneck("low_rank_adapter", down, up, hp["non_linearity"],
                                           parallel=False)))
    return out


def build_compacter(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
                    ) -> list[tuple[str, DeltaModule]]:
    dtype = jnp.dtype(hp["param_dtype"])
    n = int(hp["hypercomplex_division"])
    r = int(hp["phm_rank"])

    def new_rule() -> DeltaParam:
        return DeltaParam(_normal(rngs, (n, n, n), n**-0.5).astype(dtype),
                          logical_axes=(None, None, None))

    shared = new_rule() if hp["shared_phm_rule"] else None
    out = []
    for entry in entries:
        _, d = feature_dims(model, entry, hp["dim"])
        if d % n:
            raise DeltaError(
                f"compacter at {entry.path}: feature size {d} is not divisible by "
                f"hypercomplex_division={n}"
            )
        m = max(n, math.ceil(d / int(hp["reduction_factor"]) / n) * n)
        rule = shared if shared is not None else new_rule()
        down = PHM(rule, _normal(rngs, (n, d // n, r), 1.0),
                   _normal(rngs, (n, r, m // n), (r * d) ** -0.5), dtype)
        up = PHM(rule, _normal(rngs, (n, m // n, r), 1.0), jnp.zeros((n, r, d // n)), dtype)
        out.append((entry.path, Bottleneck("compacter", down, up, hp["non_linearity"],
                                           parallel=False)))
    return out
