"""``show(model)``: the module tree with the attached deltas and parameter counts.

Consecutive list items whose subtrees look the same are folded into one line
(``layers.0-23 ×24``), so a deep model prints in a screenful."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from cpmjax.delta._core import DeltaParam, DeltaSite, param_count
from cpmjax.delta._sites import active_names, count, names


def _own_params(module: Any) -> int:
    return int(sum(np.prod(v.shape) for v in vars(module).values()
                   if isinstance(v, nnx.Param) and not isinstance(v, DeltaParam)))


def _lines(node: Any, label: str, depth: int) -> list[str]:
    site = node if isinstance(node, DeltaSite) else None
    module = site.base if site is not None else node
    own = _own_params(module)
    head = f"{'  ' * depth}{label} ({type(module).__name__}"
    head += f", {own:,} params)" if own else ")"
    if site is not None:
        parts = []
        for n in site.order:
            delta = site.deltas[n]
            state = "" if n in site.active else ", inactive"
            parts.append(f"{delta.method}[{n}]: {param_count(delta):,}{state}")
        head += "  <- " + "; ".join(parts)
    lines = [head]
    children = [(k, c) for k, c in nnx.iter_children(module)
                if isinstance(c, nnx.Module)]
    i = 0
    while i < len(children):
        key, child = children[i]
        body = _lines(child, "#", depth + 1)
        j = i + 1
        if isinstance(key, int):
            while j < len(children) and isinstance(children[j][0], int) and (
                _lines(children[j][1], "#", depth + 1) == body
            ):
                j += 1
        name = str(key) if j == i + 1 else f"{key}-{children[j - 1][0]} ×{j - i}"
        lines.extend(_lines(child, name, depth + 1))
        i = j
    return lines


def render(model: nnx.Module) -> str:
    lines = _lines(model, type(model).__name__, 0)
    backbone = int(sum(x.size for x in jax.tree.leaves(
        nnx.state(model, nnx.All(nnx.Param, nnx.Not(DeltaParam))))))
    lines.append(f"backbone: {backbone:,} params")
    active = set(active_names(model))
    for n in names(model):
        k = count(model, n)
        lines.append(f"delta {n!r} ({'active' if n in active else 'inactive'}): {k:,} params "
                     f"({100.0 * k / max(backbone, 1):.4f}% of the backbone)")
    return "\n".join(lines)


def show(model: nnx.Module, *, print_it: bool = True) -> str:
    """Print (unless ``print_it=False``) and return the module tree with the deltas."""
    text = render(model)
    if print_it:
        print(text)
    return text
