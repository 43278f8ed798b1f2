"""The pieces every delta method shares: the parameter type, the module a method builds, and the
site that replaces a backbone module in the NNX graph.

A *site* (``DeltaSite``) takes the place of one backbone module at its attribute path. It holds
the original module unchanged (``site.base``) and the deltas attached there by name
(``site.deltas[name]``); ``site.order`` is the attach order and ``site.active`` the names that
run. Calling the site calls the base through every active delta, each of which may change the
arguments, the output, or (prefix tuning) the context the base runs in. Attributes the site does
not have are read from the base, so code that reads ``module.kernel`` or ``module.embedding``
keeps working while a delta is attached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from cpmjax.errors import DeltaError

_SITE_ATTRS = ("base", "deltas", "order", "active")


class DeltaParam(nnx.Param):
    """A delta parameter: the only thing ``cpmjax.delta.trainable`` selects."""


class DeltaModule(nnx.Module):
    """One method's parameters at one site, and how they change the base call.

    Subclasses implement ``wrap(fn, args, kwargs)``: run ``fn(*args, **kwargs)`` (the base, or the
    deltas attached before this one) and return the changed output. ``method`` names the method;
    ``merge_into(base)`` folds the delta into the base weights where that is possible."""

    method: str = "?"
    meta: str = ""  # JSON: method, hyper-parameters, targets (set when installed)

    def wrap(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def check_merge(self, base: nnx.Module, path: str) -> None:
        """Raise ``DeltaError`` unless ``merge_into(base)`` can fold this delta in."""
        raise DeltaError(f"a {self.method} delta cannot be merged into the weights (at {path})")

    def merge_into(self, base: nnx.Module, path: str) -> None:
        self.check_merge(base, path)


class DeltaSite(nnx.Module):
    """Stands in for the backbone module ``base`` at its path and runs it through the active
    deltas (in attach order)."""

    def __init__(self, base: nnx.Module):
        self.base = base
        self.deltas = nnx.Dict()
        self.order: tuple[str, ...] = ()
        self.active: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: forward to the wrapped backbone module
        if name in _SITE_ATTRS or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def add(self, name: str, delta: DeltaModule, active: bool = True) -> None:
        self.deltas[name] = delta
        self.order = (*self.order, name)
        if active:
            self.active = tuple(n for n in self.order if n in self.active or n == name)

    def remove(self, name: str) -> None:
        del self.deltas[name]
        self.order = tuple(n for n in self.order if n != name)
        self.active = tuple(n for n in self.active if n != name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn: Callable[..., Any] = self.base
        for name in self.order:
            if name in self.active:
                fn = _bind(self.deltas[name], fn)
        return fn(*args, **kwargs)


def _bind(delta: DeltaModule, fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args, **kwargs: delta.wrap(fn, args, kwargs)


def map_main(out: Any, f: Callable[[jax.Array], jax.Array]) -> Any:
    """Apply ``f`` to a module's main output: the output itself, or the first element of a tuple
    (attention modules return ``(hidden, cache)``)."""
    if isinstance(out, tuple):
        return (f(out[0]), *out[1:])
    return f(out)


def param_count(module: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, DeltaParam))))
