"""Knowledge recovery (CPET): a non-linear low-rank bypass beside a linear module,
``y = base(x) + (alpha / r) * GELU(x @ A1) @ A2`` with ``A1 [in, r]`` random and ``A2 [r, out]``
zero, so the delta starts as the identity. It is trained on a compressed backbone to restore
what compression lost; being non-linear it cannot be merged into the weights."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax.delta._addressing import Entry, linear_dims
from cpmjax.delta._core import DeltaModule, DeltaParam, map_main
from cpmjax.errors import DeltaError

DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "param_dtype": "float32"}


class Recovery(DeltaModule):
    """Non-linear low-rank bypass of a linear map ``[..., in] -> [..., out]``."""

    method = "recovery"

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, *,
                 param_dtype: Any = jnp.float32, axes: tuple[Any, Any] = (None, None),
                 rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        a1 = jax.random.uniform(rngs.params(), (in_features, r), param_dtype, -bound, bound)
        self.rec_a1 = DeltaParam(a1, logical_axes=(axes[0], None))
        self.rec_a2 = DeltaParam(jnp.zeros((r, out_features), param_dtype),
                                 logical_axes=(None, axes[1]))
        self.scale = float(scale)

    def wrap(self, fn, args, kwargs):
        x = args[0]
        out = fn(*args, **kwargs)

        def add(y: jax.Array) -> jax.Array:
            h = jax.nn.gelu(x @ self.rec_a1[...].astype(x.dtype), approximate=False)
            return y + (self.scale * (h @ self.rec_a2[...].astype(x.dtype))).astype(y.dtype)

        return map_main(out, add)


def build(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
          ) -> list[tuple[str, DeltaModule]]:
    r = int(hp["r"])
    if r < 1:
        raise DeltaError(f"recovery rank r must be >= 1, got {r}")
    out = []
    for entry in entries:
        dims = linear_dims(entry.module)
        if dims is None:
            raise DeltaError(
                f"recovery needs a linear module with a 2-D kernel [in, out]; {entry.path} is a "
                f"{type(entry.module).__name__}"
            )
        axes = getattr(entry.module.kernel, "logical_axes", None) or (None, None)
        out.append((entry.path, Recovery(dims[0], dims[1], r, float(hp["alpha"]) / r,
                                         param_dtype=jnp.dtype(hp["param_dtype"]),
                                         axes=tuple(axes), rngs=rngs)))
    return out
