"""BitFit (Ben Zaken et al., 2021): train only bias terms. Each target module (linear layers and
norms) gets a bias delta added to its output, zero at attach. Where the module already has a
bias this is the same function as training that bias, and the backbone's own values stay
untouched; merging adds the delta to the existing bias."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from cpmjax.delta._addressing import Entry, feature_dims
from cpmjax.delta._core import DeltaModule, DeltaParam, map_main
from cpmjax.errors import DeltaError

DEFAULTS: dict[str, Any] = {"dim": None, "param_dtype": "float32"}


class BiasDelta(DeltaModule):
    """``y = base(x) + bias`` with ``bias [out]``."""

    method = "bitfit"

    def __init__(self, features: int, *, param_dtype: Any = jnp.float32, axis: Any = None):
        self.bias = DeltaParam(jnp.zeros((features,), param_dtype), logical_axes=(axis,))

    def wrap(self, fn, args, kwargs):
        out = fn(*args, **kwargs)
        return map_main(out, lambda y: y + self.bias[...].astype(y.dtype))

    def check_merge(self, base: nnx.Module, path: str) -> None:
        bias = getattr(base, "bias", None)
        if not isinstance(bias, nnx.Variable) or tuple(bias.shape) != tuple(self.bias.shape):
            raise DeltaError(
                f"cannot merge the bitfit delta at {path}: {type(base).__name__} has no bias of "
                f"shape {tuple(self.bias.shape)} to fold it into"
            )

    def merge_into(self, base: nnx.Module, path: str) -> None:
        self.check_merge(base, path)
        bias = base.bias
        new = bias[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        bias.set_value(new.astype(bias.dtype))


def _out_axis(module: Any) -> Any:
    for name in ("kernel", "scale", "bias", "embedding"):
        var = getattr(module, name, None)
        if isinstance(var, nnx.Variable):
            axes = getattr(var, "logical_axes", None)
            return axes[-1] if axes else None
    return None


def build(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
          ) -> list[tuple[str, DeltaModule]]:
    del rngs
    out = []
    for entry in entries:
        _, features = feature_dims(model, entry, hp["dim"])
        out.append((entry.path, BiasDelta(features, param_dtype=jnp.dtype(hp["param_dtype"]),
                                          axis=_out_axis(entry.module))))
    return out


