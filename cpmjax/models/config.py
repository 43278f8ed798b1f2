"""Model configuration: one typed config for every supported family, read from and written to an
HF ``config.json``.

Supported ``model_type`` values:

- ``"llama"``: Llama-2/3 (GQA, optional ``llama3`` RoPE scaling, tied or untied head).
- ``"minicpm"``: MiniCPM-1B/2B (Llama blocks plus the μP scalings ``scale_emb``,
  ``scale_depth / sqrt(num_layers)`` on each residual branch, and ``hidden / (hidden_size /
  dim_model_base)`` before the head); ``num_experts > 0`` gives MiniCPM-MoE.
- ``"minicpm3"``: MiniCPM3 (the same scalings with multi-head latent attention).

Real hub checkpoints carry ``rope_theta`` + ``rope_scaling`` (with ``type`` or ``rope_type``);
transformers 5 writes ``rope_parameters`` (which includes ``rope_theta``). Both are read; the
normalised form kept here is ``rope_theta`` plus ``rope_scaling`` (a dict whose ``rope_type`` is
one of ``default``, ``linear``, ``dynamic``, ``llama3``, ``longrope``) or ``None``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from cpmjax.errors import ConfigError, MissingPathError

SUPPORTED_MODEL_TYPES = ("llama", "minicpm", "minicpm3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")

# Keys we understand; everything else in config.json is kept in ``extra`` and written back.
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "minicpm": "MiniCPMForCausalLM",
    "minicpm3": "MiniCPM3ForCausalLM",
}


class ModelConfig(BaseModel):
    """Hyper-parameters of a decoder-only LM, named as in HF ``config.json``."""

    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=())

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | list[int] | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # MiniCPM μP scalings (neutral values for llama).
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    # MiniCPM-MoE
    num_experts: int = 0
    num_experts_per_tok: int = 2
    # MiniCPM3 multi-head latent attention
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Anything else the checkpoint carried (kept so that export writes it back).
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.model_type == "minicpm3":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
                if getattr(self, name) is None:
                    raise ConfigError(f"minicpm3 config needs {name!r}")
            if self.v_head_dim is None:
                self.v_head_dim = self.hidden_size // self.num_attention_heads
            # transformers uses head_dim = qk_rope_head_dim for the rotary tables.
            self.head_dim = self.qk_rope_head_dim
        elif self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type in ("minicpm", "minicpm3"):
            if self.scale_depth is None:
                self.scale_depth = math.sqrt(self.num_hidden_layers)
            if self.dim_model_base is None:
                self.dim_model_base = self.hidden_size
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
            rs.pop("type", None)
            rs.pop("rope_theta", None)
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"rope type {rope_type!r} is not supported; expected one of "
                    f"{SUPPORTED_ROPE_TYPES}"
                )
            if rope_type == "default":
                self.rope_scaling = None
            else:
                self.rope_scaling = {"rope_type": rope_type, **rs}
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} > num_experts={self.num_experts}"
            )
        return self

    def __hash__(self) -> int:  # configs are static data of NNX graphs and jit keys
        return hash(self.model_dump_json())

    # ----------------------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def is_mla(self) -> bool:
        return self.model_type == "minicpm3"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def width_scale(self) -> float:
        """hidden_size / dim_model_base: the final hidden state is divided by it (μP)."""
        if self.model_type == "llama":
            return 1.0
        return self.hidden_size / self.dim_model_base

    @property
    def residual_scale(self) -> float:
        """Multiplier on each residual branch: scale_depth / sqrt(num_layers) (μP); 1 for llama."""
        if self.model_type == "llama":
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def embedding_scale(self) -> float:
        return 1.0 if self.model_type == "llama" else float(self.scale_emb)

    @property
    def qk_head_dim(self) -> int:
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.is_mla else self.head_dim

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def kv_cache_heads(self) -> int:
        """Heads stored in the KV cache (MLA caches expanded per-head keys and values)."""
        return self.num_attention_heads if self.is_mla else self.num_key_value_heads

    def num_parameters(self) -> int:
        """Parameter count implied by the config (embedding counted once when tied)."""
        h, inter, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        if self.is_mla:
            q = (
                h * self.q_lora_rank + self.q_lora_rank
                + self.q_lora_rank * self.num_attention_heads * self.qk_head_dim
                if self.q_lora_rank
                else h * self.num_attention_heads * self.qk_head_dim
            )
            kv = (
                h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                + self.kv_lora_rank * self.num_attention_heads
                * (self.qk_nope_head_dim + self.v_head_dim)
            )
            attn = q + kv + self.num_attention_heads * self.v_head_dim * h
        else:
            attn = h * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * inter * max(1, self.num_experts) + (h * self.num_experts)
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + n * per_layer + h + head

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF ``config.json`` (old and new RoPE keys)."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type'")
        fields = set(cls.model_fields) - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        rope_parameters = hf.pop("rope_parameters", None)
        for key, value in hf.items():
            if key in fields:
                values[key] = value
            else:
                extra[key] = value
        if rope_parameters:
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                values["rope_theta"] = rp.pop("rope_theta")
            values.setdefault("rope_scaling", None)
            if values.get("rope_scaling") is None:
                values["rope_scaling"] = rp
        if model_type == "minicpm" and "num_experts" in values and values["num_experts"] is None:
            values["num_experts"] = 0
        if isinstance(values.get("rope_scaling"), dict) and not values["rope_scaling"]:
            values["rope_scaling"] = None
        for drop in ("transformers_version", "architectures", "auto_map", "torch_dtype", "dtype",
                     "qk_head_dim", "_name_or_path"):
            extra.pop(drop, None)
        values["extra"] = extra
        try:
            return cls(**values)
        except ConfigError:
            raise
        except Exception as exc:  # pydantic ValidationError -> our typed error
            raise ConfigError(f"invalid model config: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``config.json`` from a local checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise MissingPathError(f"checkpoint path does not exist: {path}")
        if not os.path.isfile(file):
            raise MissingPathError(f"no config.json in checkpoint directory {path}")
        try:
            with open(file) as f:
                hf = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_hf_dict(hf)

    def to_hf_dict(self) -> dict[str, Any]:
        """The dict of an HF ``config.json`` that transformers (and the hub's MiniCPM code) read."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "architectures": [_HF_ARCHITECTURES[self.model_type]],
                "model_type": self.model_type,
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings,
                "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias,
                "hidden_act": self.hidden_act,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "initializer_range": self.initializer_range,
                "rope_theta": self.rope_theta,
                "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            }
        )
        if self.model_type != "minicpm3":
            out["head_dim"] = self.head_dim
        # transformers 5 reads rope_parameters; keep the legacy keys for older readers.
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update(
                {k: v for k, v in self.rope_scaling.items() if k != "rope_type"}
            )
            out["rope_scaling"]["type"] = self.rope_type
        else:
            out.pop("rope_scaling")  # transformers 5 warns on the legacy key
        out["rope_parameters"] = rope_parameters
        if self.model_type in ("minicpm", "minicpm3"):
            out.update(
                scale_emb=self.scale_emb,
                scale_depth=self.scale_depth,
                dim_model_base=self.dim_model_base,
            )
        if self.model_type == "minicpm" and self.num_experts:
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        if self.model_type == "minicpm3":
            out.update(
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
            )
        return out

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
