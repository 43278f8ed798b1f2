"""Finding modules in an NNX graph by path, and putting a site in a module's place.

A module's *path* is its attribute path from the root joined with dots, list items by index:
``model.layers.0.self_attn.q_proj``. Paths are *logical*: a module wrapped by a delta site keeps
its path (the site's internals ``base`` / ``deltas`` never appear), so the same names address a
bare backbone and one that already carries deltas.

A target is one of:

- a dotted path suffix: ``"self_attn.q_proj"`` matches every path equal to it or ending in
  ``".self_attn.q_proj"``;
- a regular expression matched against the whole path: ``r".*mlp\\.(up|down)_proj"``;
- a module class: every module that is an instance of it (``nnx.Linear``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from flax import nnx

from cpmjax.delta._core import DeltaSite
from cpmjax.errors import DeltaError

Target = str | type
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)
#: recovery's default on cpmjax models: the attention and MLP projections of every decoder layer,
#: found by name so that quantized layers (not ``nnx.Linear``) are found too
RECOVERY_TARGETS = r"(.*\.)?layers\.\d+\.(self_attn|mlp)\.\w*_proj\w*"


@dataclasses.dataclass
class Entry:
    """A backbone module found by ``walk``: its logical path, the module, where it hangs in the
    graph (``parent[key]`` or ``parent.key``), and the site wrapping it, if any."""

    path: str
    module: Any
    parent: Any
    key: Any
    site: DeltaSite | None


def walk(model: nnx.Module) -> list[Entry]:
    """Every module of the backbone in graph order, with logical paths (root first, path "")."""
    entries: list[Entry] = []
    seen: set[int] = set()

    def visit(node: Any, parent: Any, key: Any, path: tuple[Any, ...]) -> None:
        site = node if isinstance(node, DeltaSite) else None
        module = node.base if site is not None else node
        if id(module) in seen:  # a module shared by two paths is addressed by the first
            return
        seen.add(id(module))
        entries.append(Entry(".".join(str(p) for p in path), module, parent, key, site))
        for child_key, child in nnx.iter_children(module):
            if not isinstance(child, nnx.Module):
                continue
            visit(child, module, child_key, (*path, child_key))

    visit(model, None, None, ())
    return entries


def find(model: nnx.Module, path: str) -> Entry:
    for entry in walk(model):
        if entry.path == path:
            return entry
    raise DeltaError(f"no module at path {path!r} in {type(model).__name__}")


def set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, (nnx.List, nnx.Dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def matches(target: Target, entry: Entry) -> bool:
    if isinstance(target, type):
        return isinstance(entry.module, target)
    path = entry.path
    if path == target or path.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, path) is not None
    except re.error:
        return False


def _describe(target: Target) -> str:
    return target.__name__ if isinstance(target, type) else repr(target)


def resolve(
    model: nnx.Module,
    targets: Sequence[Target],
    exclude: Sequence[Target] = DEFAULT_EXCLUDE,
) -> list[Entry]:
    """The modules matched by any of ``targets`` and by none of ``exclude``, in graph order.

    Raises ``DeltaError`` naming a target that matches no module (or only excluded ones)."""
    entries = [e for e in walk(model) if e.path]
    chosen: dict[str, Entry] = {}
    for target in targets:
        hits = [e for e in entries if matches(target, e)]
        kept = [e for e in hits if not any(matches(x, e) for x in exclude)]
        if not kept:
            if hits:
                raise DeltaError(
                    f"target {_describe(target)} only matches excluded modules "
                    f"({', '.join(e.path for e in hits[:4])}); exclude={list(map(_describe, exclude))}"
                )
            sample = ", ".join(e.path for e in entries[:12])
            raise DeltaError(
                f"target {_describe(target)} matches no module of {type(model).__name__}; "
                f"paths look like: {sample} ..."
            )
        for e in kept:
            chosen.setdefault(e.path, e)
    order = {e.path: i for i, e in enumerate(entries)}
    return sorted(chosen.values(), key=lambda e: order[e.path])


# ----------------------------------------------------------------------------------------------
# shapes
def _param_shape(module: Any, name: str) -> tuple[int, ...] | None:
    value = getattr(module, name, None) if not isinstance(module, DeltaSite) else None
    if isinstance(value, nnx.Variable):
        return tuple(value.shape)
    return None


def linear_dims(module: Any) -> tuple[int, int] | None:
    """``(in, out)`` of a module holding a 2-D ``kernel [in, out]`` (``nnx.Linear`` and alike)."""
    shape = _param_shape(module, "kernel")
    if shape is not None and len(shape) == 2:
        return shape[0], shape[1]
    return None


def feature_dims(model: nnx.Module, entry: Entry, dim: int | None) -> tuple[int, int]:
    """``(in, out)`` feature sizes of a module, for deltas that act on its input or output.

    Linear-like modules give their kernel shape; norms their scale; embeddings their features;
    other modules (attention, MLP blocks, whose input and output are the hidden state) take
    ``dim=`` or the model's ``config.hidden_size``."""
    dims = linear_dims(entry.module)
    if dims is not None:
        return dims
    for name in ("scale", "bias"):
        shape = _param_shape(entry.module, name)
        if shape is not None and len(shape) == 1:
            return shape[0], shape[0]
    shape = _param_shape(entry.module, "embedding")
    if shape is not None:
        return shape[-1], shape[-1]
    if dim is not None:
        return dim, dim
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden, hidden
    raise DeltaError(
        f"cannot tell the feature size of module {entry.path} ({type(entry.module).__name__}); "
        "pass dim=<hidden size>"
    )


# ----------------------------------------------------------------------------------------------
# defaults per model family
def _cpmjax_config(model: Any) -> Any:
    try:
        from cpmjax.models import CausalLM
    except ImportError:  # pragma: no cover - models always ship with the package
        return None
    return model.config if isinstance(model, CausalLM) else None


def default_targets(model: nnx.Module, method: str) -> list[Target]:
    """The modules a method attaches to when ``targets`` is not given."""
    config = _cpmjax_config(model)
    if config is not None:
        from cpmjax.models.modules import RMSNorm

        if method == "lora":
            if config.is_mla:
                q = "self_attn.q_b_proj" if config.q_lora_rank else "self_attn.q_proj"
                return [q, "self_attn.kv_b_proj"]
            return ["self_attn.q_proj", "self_attn.v_proj"]
        if method == "bitfit":
            return [nnx.Linear, RMSNorm]
        if method == "recovery":  # CPET: beside every projection of the decoder, float or
            return [RECOVERY_TARGETS]  # quantized (cpmjax.compress.QuantizedLinear); no head
        if method in ("adapter", "parallel_adapter", "low_rank_adapter", "compacter"):
            return ["self_attn", "mlp"]
        if method == "prefix":
            return ["self_attn"]
        if method == "soft_prompt":
            return ["model.embed_tokens"]
    else:
        if method in ("lora", "recovery"):
            return [nnx.Linear]
        if method == "bitfit":
            return [nnx.Linear, nnx.LayerNorm, nnx.RMSNorm]
        if method == "soft_prompt":
            return [nnx.Embed]
    raise DeltaError(
        f"no default targets of method {method!r} for a {type(model).__name__}; pass targets="
    )


def targets_repr(targets: Iterable[Target]) -> list[str]:
    return [t.__module__ + "." + t.__qualname__ if isinstance(t, type) else t for t in targets]
