"""Where the deltas of a model are: its delta sites, the deltas attached at each, installing
built deltas, the parameter filter, and counts. Shared by the handle (``_api``), saving and
loading (``_io``, ``_peft``) and ``show``; it imports none of them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from flax import nnx

from cpmjax.delta._addressing import find, set_child, walk
from cpmjax.delta._core import DeltaModule, DeltaParam, DeltaSite
from cpmjax.errors import DeltaError


def sites(model: nnx.Module) -> list[tuple[str, DeltaSite, Any, Any]]:
    """``(path, site, parent, key)`` of every delta site, in graph order."""
    return [(e.path, e.site, e.parent, e.key) for e in walk(model) if e.site is not None]


def delta_modules(model: nnx.Module, name: str) -> list[tuple[str, DeltaModule]]:
    """``(path, module)`` of the delta ``name`` at each of its sites."""
    return [(path, site.deltas[name]) for path, site, _, _ in sites(model) if name in site.order]


def names(model: nnx.Module) -> list[str]:
    """Names of the deltas attached to ``model``, in attach order."""
    seen: dict[str, None] = {}
    for _, site, _, _ in sites(model):
        for n in site.order:
            seen.setdefault(n, None)
    return list(seen)


def active_names(model: nnx.Module) -> list[str]:
    """Names of the deltas that run now, in attach order."""
    seen: dict[str, None] = {}
    for _, site, _, _ in sites(model):
        for n in site.active:
            seen.setdefault(n, None)
    return list(seen)


def install(model: nnx.Module, name: str, built: list[tuple[str, DeltaModule]],
            active: bool = True, meta: dict[str, Any] | None = None) -> None:
    """Put each built delta at its path (creating the site if the module has none). ``meta``
    (method, hyper-parameters, targets) is kept on each module, as static JSON text."""
    if name in names(model):
        raise DeltaError(f"a delta named {name!r} is already attached; detach it or pick a name")
    for path, _ in built:
        find(model, path)  # every path exists before anything changes
    meta_text = json.dumps(meta or {}, sort_keys=True, default=str)
    for path, module in built:
        module.meta = meta_text
        entry = find(model, path)
        site = entry.site
        if site is None:
            site = DeltaSite(entry.module)
            set_child(entry.parent, entry.key, site)
        site.add(name, module, active)


def json_safe(hp: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as JSON values (a ``param_dtype`` by its name)."""
    import jax.numpy as jnp

    return {k: (str(jnp.dtype(v).name) if k == "param_dtype" else v) for k, v in hp.items()}


@dataclasses.dataclass(frozen=True)
class DeltaFilter:
    """NNX filter: the parameters of the named deltas (all deltas with ``names=None``)."""

    names: frozenset[str] | None

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, DeltaParam):
            return False
        if self.names is None:
            return True
        return any(path[i] == "deltas" and path[i + 1] in self.names
                   for i in range(len(path) - 1))


def count(model: nnx.Module, name: str) -> int:
    """Parameters of delta ``name`` (a variable shared by several sites counts once)."""
    state = nnx.state(model, DeltaFilter(frozenset([name])))
    return int(sum(x.size for x in jax.tree.leaves(state)))
