"""attach / detach / activate / trainable / merge, and the ``Delta`` handle."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from flax import nnx

from cpmjax.delta._addressing import (
    DEFAULT_EXCLUDE,
    Target,
    default_targets,
    resolve,
    set_child,
    targets_repr,
)
from cpmjax.delta._core import DeltaModule, DeltaParam
from cpmjax.delta._io import load_delta, save_delta
from cpmjax.delta._methods import get_method, hyperparameters
from cpmjax.delta._peft import read_peft, write_peft
from cpmjax.delta._sites import (
    DeltaFilter,
    active_names,
    count,
    delta_modules,
    install,
    json_safe,
    names,
    sites,
)
from cpmjax.errors import DeltaError

# kept under its old name: the tests compare saved hyper-parameters through it
_json_safe = json_safe


# ----------------------------------------------------------------------------------------------
# the handle
class Delta:
    """A named delta attached to ``model``: what ``attach`` and ``load`` return."""

    def __init__(self, model: nnx.Module, name: str, method: str, hparams: dict[str, Any],
                 targets: list[str]):
        self.model = model
        self.name = name
        self.method = method
        self.hparams = dict(hparams)
        self.targets = list(targets)

    def __repr__(self) -> str:
        return (f"Delta(name={self.name!r}, method={self.method!r}, sites={len(self.sites)}, "
                f"params={self.num_params():,})")

    @property
    def sites(self) -> list[str]:
        return [path for path, _ in delta_modules(self.model, self.name)]

    def modules(self) -> list[tuple[str, DeltaModule]]:
        return delta_modules(self.model, self.name)

    def num_params(self) -> int:
        # shared variables (the compacter rule) count once
        return count(self.model, self.name)

    def state(self) -> nnx.State:
        """The delta's parameters as an NNX state (paths as in the model graph)."""
        return nnx.state(self.model, trainable(self.model, self.name))

    def save(self, path: str) -> str:
        """Write the delta alone to directory ``path``: ``delta.safetensors`` + ``delta.json``
        (method, hyper-parameters, sites, and a hash of the backbone config)."""
        return save_delta(self.model, self.name, self.method, self.hparams, self.targets, path)

    def save_peft(self, path: str) -> str:
        """Write a LoRA delta as a PEFT adapter (``adapter_config.json`` +
        ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads."""
        return write_peft(self.model, self.name, self.method, path)

    def detach(self) -> None:
        """Remove the delta; modules left without deltas get their original object back."""
        detach(self.model, self.name)

    def activate(self) -> _Activation:
        """Make this delta the only active one (a context manager restores the previous)."""
        return activate(self.model, self.name)


def attach(
    model: nnx.Module,
    method: str,
    targets: Target | Sequence[Target] | None = None,
    exclude: Target | Sequence[Target] | None = None,
    name: str = "default",
    *,
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
    active: bool = True,
    **hparams: Any,
) -> Delta:
    """Attach a delta of ``method`` to the modules of ``model`` matched by ``targets``.

    ``targets``: dotted path suffixes, regular expressions over full paths, or module classes
    (default: per model family, see ``docs/delta.md``); ``exclude`` likewise (default: the LM
    head). ``hparams`` are the method's hyper-parameters (``r``, ``alpha`` for LoRA ...). The
    delta becomes active alongside those already active unless ``active=False``. The backbone's
    modules and values are not changed: each target is replaced in the graph by a site holding
    the original module."""
    spec = get_method(method)
    hp = hyperparameters(spec, hparams)
    if targets is None:
        targets = default_targets(model, spec.name)
    elif isinstance(targets, (str, type)):
        targets = [targets]
    if exclude is None:
        exclude = list(DEFAULT_EXCLUDE)
    elif isinstance(exclude, (str, type)):
        exclude = [exclude]
    if name in names(model):
        raise DeltaError(f"a delta named {name!r} is already attached; detach it or pick a name")
    entries = resolve(model, list(targets), list(exclude))
    built = spec.build(model, entries, hp, rngs if rngs is not None else nnx.Rngs(seed))
    install(model, name, built, active,
            {"method": spec.name, "hparams": json_safe(hp), "targets": targets_repr(targets)})
    return Delta(model, name, spec.name, hp, targets_repr(targets))


def get(model: nnx.Module, name: str = "default") -> Delta:
    """The handle of an attached delta."""
    mods = delta_modules(model, name)
    if not mods:
        raise DeltaError(f"no delta named {name!r} is attached; attached: {names(model)}")
    meta = json.loads(getattr(mods[0][1], "meta", "{}") or "{}")
    return Delta(model, name, meta.get("method", mods[0][1].method), meta.get("hparams", {}),
                 meta.get("targets", [p for p, _ in mods]))


def _name_of(delta: Delta | str) -> str:
    return delta.name if isinstance(delta, Delta) else delta


def detach(model: nnx.Module, delta: Delta | str | None = None) -> None:
    """Remove one delta (or all with ``None``); restores the original module objects."""
    if delta is None:
        for n in names(model):
            detach(model, n)
        return
    name = _name_of(delta)
    found = False
    for _, site, parent, key in sites(model):
        if name in site.order:
            found = True
            site.remove(name)
            if not site.order:
                set_child(parent, key, site.base)
    if not found:
        raise DeltaError(f"no delta named {name!r} is attached; attached: {names(model)}")


class _Activation:
    """Returned by ``activate``: already in effect; as a context manager it restores the
    previously active deltas on exit."""

    def __init__(self, model: nnx.Module, previous: dict[str, tuple[str, ...]]):
        self._model = model
        self._previous = previous

    def __enter__(self) -> _Activation:
        return self

    def __exit__(self, *exc: Any) -> None:
        for path, site, _, _ in sites(self._model):
            if path in self._previous:
                site.active = tuple(n for n in site.order if n in self._previous[path])


def activate(model: nnx.Module, name: str | Iterable[str] | None) -> _Activation:
    """Run only the named delta(s) (``None``: the bare backbone). Switching changes static
    structure, so a jitted function compiles once per combination and then reuses it."""
    wanted = set() if name is None else {name} if isinstance(name, str) else set(name)
    attached = names(model)
    unknown = sorted(wanted - set(attached))
    if unknown:
        raise DeltaError(f"cannot activate {unknown}: attached deltas are {attached}")
    previous = {}
    for path, site, _, _ in sites(model):
        previous[path] = site.active
        site.active = tuple(n for n in site.order if n in wanted)
    return _Activation(model, previous)


def trainable(model: nnx.Module, name: str | Iterable[str] | None = None) -> DeltaFilter:
    """An NNX filter selecting exactly the delta parameters: of ``name`` (one or several), or by
    default of the deltas that are active now. Use it as ``nnx.Optimizer(model, tx,
    wrt=trainable(model))`` and ``nnx.DiffState(0, trainable(model))``."""
    if name is None:
        selected = active_names(model)
        if not selected:
            raise DeltaError("no active delta on this model: attach one or activate one")
    else:
        selected = [name] if isinstance(name, str) else list(name)
        unknown = sorted(set(selected) - set(names(model)))
        if unknown:
            raise DeltaError(f"no delta named {unknown} is attached; attached: {names(model)}")
    return DeltaFilter(frozenset(selected))


def backbone(model: nnx.Module) -> nnx.State:
    """The backbone parameters (everything that is an ``nnx.Param`` and not a delta)."""
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(DeltaParam)))


def merge(model: nnx.Module, delta: Delta | str = "default") -> nnx.Module:
    """Fold a mergeable delta (LoRA; BitFit where the module has a bias) into the backbone
    weights and detach it. The model then has its original structure (if no other delta is
    attached) and exports with ``cpmjax.save_pretrained``."""
    name = _name_of(delta)
    found = [(p, s) for p, s, _, _ in sites(model) if name in s.order]
    if not found:
        raise DeltaError(f"no delta named {name!r} is attached; attached: {names(model)}")
    for path, site in found:
        earlier = site.order[: site.order.index(name)]
        if any(n in site.active for n in earlier):
            raise DeltaError(
                f"cannot merge {name!r} at {path}: delta(s) {list(earlier)} run inside it; "
                "merge or detach them first"
            )
        site.deltas[name].check_merge(site.base, path)
    for path, site in found:
        site.deltas[name].merge_into(site.base, path)
    detach(model, name)
    return model


# ----------------------------------------------------------------------------------------------
# files
def load(model: nnx.Module, path: str, name: str | None = None, *, active: bool = True) -> Delta:
    """Attach the delta saved at ``path`` (by ``Delta.save``) to ``model`` (under its saved
    name, or ``name``). A backbone whose fingerprint differs raises ``DeltaError`` naming the
    difference."""
    name, method, hparams, targets = load_delta(model, path, name, active=active)
    return Delta(model, name, method, hparams, targets)


def load_peft(model: nnx.Module, path: str, name: str = "default", *, active: bool = True
              ) -> Delta:
    """Attach the PEFT LoRA adapter in directory ``path`` to ``model``."""
    name, method, hparams, targets = read_peft(model, path, name, active=active)
    return Delta(model, name, method, hparams, targets)


def save_peft(delta: Delta, path: str) -> str:
    """Write a LoRA delta as a PEFT adapter directory (same as ``delta.save_peft(path)``)."""
    return delta.save_peft(path)


__all__ = [
    "Delta",
    "DeltaFilter",
    "activate",
    "active_names",
    "attach",
    "backbone",
    "count",
    "delta_modules",
    "detach",
    "get",
    "install",
    "load",
    "load_peft",
    "merge",
    "names",
    "save_peft",
    "sites",
    "trainable",
]
