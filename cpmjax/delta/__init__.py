"""Delta tuning for any Flax NNX model: LoRA, BitFit, adapters (sequential, parallel, low-rank,
Compacter), prefix tuning and soft prompts, attached by module path without touching the
backbone's code.

    delta = cpmjax.delta.attach(model, "lora", targets=["self_attn.q_proj", "self_attn.v_proj"],
                                r=8, alpha=16)
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=cpmjax.delta.trainable(model))
    cpmjax.delta.show(model)
    delta.save("out/lora")                   # the delta alone + backbone fingerprint
    cpmjax.delta.load(fresh_model, "out/lora")
    with cpmjax.delta.activate(model, "task_a"): ...   # several named deltas, one active
    cpmjax.delta.merge(model, delta)         # fold LoRA into the weights
    cpmjax.delta.inherit("out/lora", compressed)  # CPET: a delta onto a compressed backbone
    delta.detach()                           # the exact original modules come back

See docs/delta.md.
"""

from cpmjax.delta._addressing import DEFAULT_EXCLUDE, default_targets
from cpmjax.delta._api import (
    Delta,
    DeltaFilter,
    activate,
    active_names,
    attach,
    backbone,
    detach,
    get,
    load,
    load_peft,
    merge,
    names,
    save_peft,
    trainable,
)
from cpmjax.delta._core import DeltaModule, DeltaParam, DeltaSite
from cpmjax.delta._inherit import inherit
from cpmjax.delta._io import fingerprint
from cpmjax.delta._methods import METHODS
from cpmjax.delta._show import show

__all__ = [
    "DEFAULT_EXCLUDE",
    "METHODS",
    "Delta",
    "DeltaFilter",
    "DeltaModule",
    "DeltaParam",
    "DeltaSite",
    "activate",
    "active_names",
    "attach",
    "backbone",
    "default_targets",
    "detach",
    "fingerprint",
    "get",
    "inherit",
    "load",
    "load_peft",
    "merge",
    "names",
    "save_peft",
    "show",
    "trainable",
]
