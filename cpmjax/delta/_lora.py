"""LoRA (Hu et al., 2021): ``y = base(x) + (alpha / r) * x @ A @ B`` on a linear module with
kernel ``[in, out]``; ``A [in, r]`` random, ``B [r, out]`` zero, so the delta starts as the
identity. Merging adds ``(alpha / r) * A @ B`` to the kernel."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax.delta._addressing import Entry, linear_dims
from cpmjax.delta._core import DeltaModule, DeltaParam, map_main
from cpmjax.errors import DeltaError

DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "rslora": False, "param_dtype": "float32"}


class LoRA(DeltaModule):
    """Low-rank update of a linear map ``[..., in] -> [..., out]``."""

    method = "lora"

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, *,
                 param_dtype: Any = jnp.float32, axes: tuple[Any, Any] = (None, None),
                 rngs: nnx.Rngs):
        # A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a=sqrt(5), as PEFT), B = 0
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(rngs.params(), (in_features, r), param_dtype, -bound, bound)
        self.lora_a = DeltaParam(a, logical_axes=(axes[0], None))
        self.lora_b = DeltaParam(jnp.zeros((r, out_features), param_dtype),
                                 logical_axes=(None, axes[1]))
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    def delta_weight(self) -> jax.Array:
        """``scale * A @ B`` as ``[in, out]`` in float32."""
        a = self.lora_a[...].astype(jnp.float32)
        return self.scale * (a @ self.lora_b[...].astype(jnp.float32))

    def wrap(self, fn, args, kwargs):
        x = args[0]
        out = fn(*args, **kwargs)

        def add(y: jax.Array) -> jax.Array:
            low = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
            return y + (self.scale * low).astype(y.dtype)

        return map_main(out, add)

    def check_merge(self, base: nnx.Module, path: str) -> None:
        kernel = getattr(base, "kernel", None)
        if not isinstance(kernel, nnx.Variable) or tuple(kernel.shape) != (
            self.lora_a.shape[0], self.lora_b.shape[1]
        ):
            raise DeltaError(f"cannot merge the lora delta at {path}: no matching kernel")

    def merge_into(self, base: nnx.Module, path: str) -> None:
        self.check_merge(base, path)
        kernel = base.kernel
        new = kernel[...].astype(jnp.float32) + self.delta_weight()
        kernel.set_value(new.astype(kernel.dtype))


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def build(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
          ) -> list[tuple[str, DeltaModule]]:
    out = []
    r = int(hp["r"])
    if r < 1:
        raise DeltaError(f"lora rank r must be >= 1, got {r}")
    for entry in entries:
        dims = linear_dims(entry.module)
        if dims is None:
            raise DeltaError(
                f"lora needs a linear module with a 2-D kernel [in, out]; {entry.path} is a "
                f"{type(entry.module).__name__}"
            )
        axes = getattr(entry.module.kernel, "logical_axes", None) or (None, None)
        out.append((entry.path, LoRA(dims[0], dims[1], r, lora_scale(r, hp["alpha"], hp["rslora"]),
                                     param_dtype=jnp.dtype(hp["param_dtype"]), axes=tuple(axes),
                                     rngs=rngs)))
    return out
