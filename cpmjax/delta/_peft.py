"""PEFT-format LoRA adapters in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT stores, for a module named ``<path>`` in the transformers model, ``lora_A.weight [r, in]``
and ``lora_B.weight [out, r]`` under ``base_model.model.<path>.``, and scales by
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per-module ranks and alphas
coming from ``rank_pattern`` / ``alpha_pattern``. cpmjax models use the transformers module
names as their paths, so names map one to one; our LoRA holds ``A = lora_A.T [in, r]`` and
``B = lora_B.T [r, out]``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.delta._addressing import find, linear_dims
from cpmjax.delta._lora import LoRA, lora_scale
from cpmjax.delta._sites import delta_modules, install
from cpmjax.errors import DeltaError, MissingPathError
from cpmjax.safetensors_io import atomic_directory, read_tensors, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


def read_peft(model: nnx.Module, path: str, name: str = "default", *, active: bool = True
              ) -> tuple[str, str, dict[str, Any], list[str]]:
    """Attach the PEFT LoRA adapter in directory ``path`` to ``model``; returns its ``(name,
    method, hyper-parameters, targets)``."""
    cfg_file, weights_file = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for file in (cfg_file, weights_file):
        if not os.path.isfile(file):
            raise MissingPathError(f"not a PEFT adapter directory: {file} is missing")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise DeltaError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = []
    if cfg.get("use_dora"):
        unsupported.append("use_dora=true")
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r} (use a bitfit delta)")
    if cfg.get("modules_to_save"):
        unsupported.append(f"modules_to_save={cfg['modules_to_save']}")
    if cfg.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=true")
    if unsupported:
        raise DeltaError(f"{cfg_file}: unsupported PEFT LoRA options: {', '.join(unsupported)}")
    tensors = read_tensors(weights_file)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise DeltaError(f"{weights_file}: tensor {key} is not a LoRA A/B weight")
        pairs.setdefault(m["path"], {})[m["ab"]] = value
    built = []
    for module_path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise DeltaError(f"{weights_file}: {module_path} lacks lora_A or lora_B")
        entry = find(model, module_path)
        dims = linear_dims(entry.module)
        a, b = ab["A"].T, ab["B"].T  # [in, r], [r, out]
        if dims is None or dims != (a.shape[0], b.shape[1]) or a.shape[1] != b.shape[0]:
            raise DeltaError(
                f"PEFT adapter tensors for {module_path} (A {ab['A'].shape}, B {ab['B'].shape}) "
                f"do not fit {type(entry.module).__name__} with kernel [in, out] {dims}"
            )
        r = a.shape[1]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module_path, cfg.get("lora_alpha", 8))
        lora = LoRA(a.shape[0], b.shape[1], r, lora_scale(r, float(alpha),
                                                          bool(cfg.get("use_rslora"))),
                    rngs=nnx.Rngs(0))
        lora.lora_a.set_value(jnp.asarray(a, jnp.float32))
        lora.lora_b.set_value(jnp.asarray(b, jnp.float32))
        built.append((module_path, lora))
    if not built:
        raise DeltaError(f"{weights_file} holds no LoRA weights")
    first = built[0][1]
    hparams = {"r": first.rank, "alpha": first.scale * first.rank, "rslora": False,
               "param_dtype": "float32"}
    targets = [p for p, _ in built]
    install(model, name, built, active, {"method": "lora", "hparams": hparams, "targets": targets})
    return name, "lora", hparams, targets


def write_peft(model: nnx.Module, name: str, method: str, path: str) -> str:
    """Write the LoRA delta ``name`` of ``model`` as a PEFT adapter directory, atomically."""
    mods = delta_modules(model, name)
    if not mods or not all(isinstance(m, LoRA) for _, m in mods):
        raise DeltaError(f"only LoRA deltas save in PEFT format; {name!r} is {method}")
    tensors = {}
    for module_path, lora in mods:
        tensors[f"{_PREFIX}{module_path}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(lora.lora_a[...], np.float32).T)
        tensors[f"{_PREFIX}{module_path}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(lora.lora_b[...], np.float32).T)
    r0 = mods[0][1].rank
    alpha0 = mods[0][1].scale * r0
    rank_pattern = {re.escape(p): m.rank for p, m in mods if m.rank != r0}
    alpha_pattern = {re.escape(p): m.scale * m.rank for p, m in mods
                     if m.scale * m.rank != alpha0}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": "|".join(re.escape(p) for p, _ in mods),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    return path
