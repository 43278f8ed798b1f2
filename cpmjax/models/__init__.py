"""Model definitions (Flax NNX): Llama, MiniCPM (dense and MoE), MiniCPM3 (MLA)."""

from cpmjax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from cpmjax.models.transformer import Cache, CausalLM, resolve_dtype

__all__ = ["SUPPORTED_MODEL_TYPES", "Cache", "CausalLM", "ModelConfig", "resolve_dtype"]
