"""cpmjax: MiniCPM-family models and the THUNLP/OpenBMB efficiency line in JAX.

Public API::

    model = cpmjax.from_pretrained(path, dtype="bfloat16", mesh=None)
    logits = model(input_ids)                       # float32 [batch, seq, vocab]
    result = cpmjax.generate(model, input_ids, max_new_tokens=64, temperature=0.0)
    result = cpmjax.generate(model, input_ids, 64, speculative=cpmjax.Speculative())  # EAGLE-2
    cpmjax.default_model_path(), cpmjax.default_draft_path()   # the bundled model and draft
    cpmjax.save_pretrained(model, out_dir)
    tokenizer = cpmjax.load_tokenizer(path)
"""

from __future__ import annotations

import os

from cpmjax import errors
from cpmjax.generate import (
    GenerationResult,
    GenerationStats,
    SamplingConfig,
    Speculative,
    SpeculativeStats,
    default_draft_path,
    generate,
)
from cpmjax.hf import from_pretrained, save_pretrained
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.tokenizer import load_tokenizer

__version__ = "0.1.0"

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_MODEL_NAME = "cpmjax-tiny"


def default_model_path() -> str:
    """Directory of the bundled default model (``cpmjax-tiny``), shipped inside the package."""
    path = os.path.join(_ASSETS, DEFAULT_MODEL_NAME)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise errors.MissingPathError(
            f"the bundled default model is missing at {path}; reinstall cpmjax or pass --model"
        )
    return path


__all__ = [
    "CausalLM",
    "GenerationResult",
    "GenerationStats",
    "Speculative",
    "SpeculativeStats",
    "ModelConfig",
    "SamplingConfig",
    "default_draft_path",
    "default_model_path",
    "errors",
    "from_pretrained",
    "generate",
    "load_tokenizer",
    "save_pretrained",
]
