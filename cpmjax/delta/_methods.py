"""The registry of delta methods: name, hyper-parameter defaults, and how to build them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import cpmjax.delta._adapters as _adapters
import cpmjax.delta._bitfit as _bitfit
import cpmjax.delta._lora as _lora
import cpmjax.delta._prefix as _prefix
import cpmjax.delta._recovery as _recovery
import cpmjax.delta._soft_prompt as _soft_prompt
from cpmjax.errors import DeltaError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    defaults: dict[str, Any]
    build: Callable[..., list]
    identity_at_init: bool
    mergeable: bool
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", _lora.DEFAULTS, _lora.build, True, True,
               "low-rank update of linear kernels (Hu et al., 2021)"),
        Method("bitfit", _bitfit.DEFAULTS, _bitfit.build, True, True,
               "bias terms on linear layers and norms (Ben Zaken et al., 2021)"),
        Method("adapter", _adapters.ADAPTER_DEFAULTS, _adapters.build_adapter, True, False,
               "sequential bottleneck adapter (Houlsby et al., 2019)"),
        Method("parallel_adapter", _adapters.PARALLEL_DEFAULTS, _adapters.build_parallel, True,
               False, "parallel bottleneck adapter (He et al., 2022)"),
        Method("low_rank_adapter", _adapters.LOW_RANK_DEFAULTS, _adapters.build_low_rank, True,
               False, "adapter with low-rank projections (Mahabadi et al., 2021)"),
        Method("compacter", _adapters.COMPACTER_DEFAULTS, _adapters.build_compacter, True, False,
               "adapter with shared PHM projections (Mahabadi et al., 2021)"),
        Method("prefix", _prefix.DEFAULTS, _prefix.build, False, False,
               "learned key/value prefix per attention layer (Li & Liang, 2021)"),
        Method("soft_prompt", _soft_prompt.DEFAULTS, _soft_prompt.build, False, False,
               "learned input embeddings prepended to the sequence (Lester et al., 2021)"),
        Method("recovery", _recovery.DEFAULTS, _recovery.build, True, False,
               "non-linear low-rank bypass restoring a compressed backbone (CPET)"),
    )
}
ALIASES = {"prefix_tuning": "prefix", "prompt_tuning": "soft_prompt", "low_rank": "low_rank_adapter",
           "lowrank_adapter": "low_rank_adapter", "parallel": "parallel_adapter"}


def get_method(name: str) -> Method:
    key = ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in METHODS:
        raise DeltaError(f"unknown delta method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[key]


def hyperparameters(method: Method, given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(method.defaults))
    if unknown:
        raise DeltaError(
            f"unknown hyper-parameter(s) {unknown} for method {method.name!r}; it takes "
            f"{sorted(method.defaults)}"
        )
    return {**method.defaults, **given}
