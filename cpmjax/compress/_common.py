"""What the compressions share: finding the decoder's linear modules by path, the compression
record kept on the model, calibration batches, and capturing what a module is called with."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.delta import DeltaSite
from cpmjax.errors import CompressionError

#: paths never compressed unless asked: embeddings and the LM head
DEFAULT_EXCLUDE: tuple[str, ...] = (r".*embed_tokens.*", r".*lm_head.*")


def modules(model: nnx.Module) -> list[tuple[str, Any, Any, Any]]:
    """``(path, module, parent, key)`` of every module in graph order; delta sites are seen
    through (the path of a wrapped module is its own, its parent the site)."""
    out: list[tuple[str, Any, Any, Any]] = []
    seen: set[int] = set()

    def visit(node: Any, parent: Any, key: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, DeltaSite):
            parent, key, node = node, "base", node.base
        if id(node) in seen:
            return
        seen.add(id(node))
        out.append((".".join(str(p) for p in path), node, parent, key))
        for child_key, child in nnx.iter_children(node):
            if isinstance(child, nnx.Module) and child_key not in ("deltas",):
                visit(child, node, child_key, (*path, child_key))

    visit(model, None, None, ())
    return out


def set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, (nnx.List, nnx.Dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def excluded(path: str, exclude: Sequence[str]) -> bool:
    return any(re.fullmatch(x, path) or path == x or path.endswith("." + x) for x in exclude)


def decoder_linears(model: nnx.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    kind: type = nnx.Linear) -> list[tuple[str, Any, Any, Any]]:
    """The linear modules (2-D ``kernel [in, out]``) under ``model.layers`` not excluded."""
    for x in exclude:
        try:
            re.compile(x)
        except re.error as e:
            raise CompressionError(f"exclude pattern {x!r} is not a regular expression: {e}") from e
    return [(p, m, parent, key) for p, m, parent, key in modules(model)
            if isinstance(m, kind) and ".layers." in f".{p}" and not excluded(p, exclude)]


def record(model: nnx.Module, kind: str, **info: Any) -> None:
    """Append one compression step to ``model.compression`` (JSON text, static)."""
    steps = json.loads(getattr(model, "compression", None) or "[]")
    steps.append({"kind": kind, **info})
    model.compression = json.dumps(steps, sort_keys=True)


def compression_of(model: nnx.Module) -> list[dict[str, Any]]:
    """The compression steps applied to ``model``, oldest first (``[]`` for none)."""
    return json.loads(getattr(model, "compression", None) or "[]")


def calibration_batches(calibration: Any, vocab_size: int | None) -> list[jax.Array]:
    """Token-id batches ``[b, s]`` from one array or an iterable of arrays, checked."""
    if calibration is None:
        raise CompressionError("calibration batches are needed: pass calibration=token ids "
                               "[batch, seq] (or a list of such arrays)")
    if isinstance(calibration, (np.ndarray, jax.Array)):
        calibration = [calibration]
    batches = []
    for i, b in enumerate(calibration if isinstance(calibration, Iterable) else [calibration]):
        arr = np.asarray(b)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise CompressionError(f"calibration batch {i} must be integer token ids [batch, "
                                   f"seq]; got dtype {arr.dtype} shape {arr.shape}")
        if vocab_size is not None and (arr.min() < 0 or arr.max() >= vocab_size):
            raise CompressionError(f"calibration batch {i} has token ids outside [0, "
                                   f"{vocab_size})")
        batches.append(jnp.asarray(arr, jnp.int32))
    if not batches:
        raise CompressionError("calibration holds no batches")
    return batches


def capture(model: nnx.Module, targets: dict[str, Any], batches: list[jax.Array],
            reduce: Callable[[jax.Array, Any], Any]) -> dict[str, Any]:
    """Run ``model`` eagerly over ``batches`` and fold the first argument each target module is
    called with into ``reduce(x, previous)`` (``previous`` is ``None`` at first); returns the
    folded value per path. Each target is swapped, for the duration, to a subclass of its own
    class that records its input; the classes are restored afterwards, even on error."""
    store: dict[str, Any] = {}
    by_id = {id(m): p for p, m in targets.items()}
    originals: list[tuple[Any, type]] = []
    subclasses: dict[type, type] = {}

    def recording(cls: type) -> type:
        if cls not in subclasses:
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                path = by_id[id(self)]
                store[path] = reduce(args[0], store.get(path))
                return cls.__call__(self, *args, **kwargs)

            subclasses[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
        return subclasses[cls]

    try:
        for m in targets.values():
            originals.append((m, type(m)))
            m.__class__ = recording(type(m))
        for b in batches:
            model(b)
    finally:
        for m, cls in originals:
            m.__class__ = cls
    missing = sorted(set(targets) - set(store))
    if missing:
        raise CompressionError(f"the model never called {missing[:4]} during calibration")
    return store


def sum_squares(x: jax.Array, previous: Any) -> jax.Array:
    """Per-feature sum of squares over every token: ``[in]`` float32."""
    s = jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)
    return s if previous is None else previous + s
