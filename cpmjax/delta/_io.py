"""Saving a delta alone and loading it into a backbone.

A saved delta is a directory with

- ``delta.safetensors``: one tensor per delta parameter, named ``<site path>::<param path>``
  (``model.layers.0.self_attn.q_proj::lora_a``);
- ``delta.json``: format version, name, method, hyper-parameters, the sites, and the backbone's
  fingerprint: its config (for cpmjax models; dtype-free) with a hash, and a hash of its
  parameter paths and shapes.

``load`` refuses a backbone whose fingerprint differs and names what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.delta._addressing import find, walk
from cpmjax.delta._core import DeltaModule, DeltaParam
from cpmjax.delta._lora import LoRA
from cpmjax.delta._methods import get_method, hyperparameters
from cpmjax.delta._sites import delta_modules, install, json_safe
from cpmjax.delta._soft_prompt import PromptStrip
from cpmjax.errors import DeltaError, MissingPathError
from cpmjax.safetensors_io import atomic_directory, read_tensors, save_file

FORMAT = "cpmjax-delta"
VERSION = 1
WEIGHTS = "delta.safetensors"
CONFIG = "delta.json"
# config.json keys that say nothing about the function the backbone computes
_NOT_ARCHITECTURE = {"torch_dtype", "dtype", "transformers_version", "_name_or_path",
                     "architectures", "auto_map", "use_cache", "bos_token_id", "eos_token_id",
                     "pad_token_id"}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def backbone_params(model: nnx.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(logical path, shape)`` of every backbone parameter (delta sites see through)."""
    out = []
    for entry in walk(model):
        for key, value in vars(entry.module).items():
            if isinstance(value, nnx.Param) and not isinstance(value, DeltaParam):
                path = f"{entry.path}.{key}" if entry.path else key
                out.append((path, tuple(value.shape)))
    return sorted(out)


def fingerprint(model: nnx.Module) -> dict[str, Any]:
    """What identifies the backbone a delta was trained on."""
    config = getattr(model, "config", None)
    cfg = None
    if config is not None and hasattr(config, "to_hf_dict"):
        cfg = {k: v for k, v in config.to_hf_dict().items() if k not in _NOT_ARCHITECTURE}
    params = backbone_params(model)
    return {
        "model_class": type(model).__name__,
        "config": cfg,
        "config_hash": None if cfg is None else _sha(cfg),
        "structure_hash": _sha(params),
        "num_params": int(sum(int(np.prod(s)) for _, s in params)),
    }


def check_backbone(saved: dict[str, Any], model: nnx.Module, source: str) -> None:
    """Raise ``DeltaError`` naming the difference when ``model`` is not the saved backbone."""
    here = fingerprint(model)
    if saved.get("config_hash") and here["config_hash"] and (
        saved["config_hash"] != here["config_hash"]
    ):
        a, b = saved["config"] or {}, here["config"] or {}
        diff = [f"{k}: delta={a.get(k)!r} model={b.get(k)!r}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise DeltaError(
            f"delta {source} was made for a different backbone (config hash "
            f"{saved['config_hash']} vs {here['config_hash']}); differences: {'; '.join(diff[:6])}"
        )
    if saved.get("structure_hash") != here["structure_hash"]:
        raise DeltaError(
            f"delta {source} was made for a different backbone: parameter structure hash "
            f"{saved.get('structure_hash')} vs {here['structure_hash']} ({saved.get('num_params')}"
            f" vs {here['num_params']} parameters, {saved.get('model_class')} vs "
            f"{here['model_class']})"
        )


def _flat(module: DeltaModule) -> list[tuple[str, nnx.Variable]]:
    return [(".".join(str(p) for p in path), var)
            for path, var in nnx.to_flat_state(nnx.state(module, DeltaParam))]


def save_delta(model: nnx.Module, name: str, method: str, hparams: dict[str, Any],
               targets: list[str], path: str) -> str:
    """Write the delta ``name`` of ``model`` to directory ``path`` (``delta.safetensors`` +
    ``delta.json``), atomically: a failed save leaves the previous one."""
    mods = delta_modules(model, name)
    if not mods:
        raise DeltaError(f"delta {name!r} is no longer attached; nothing to save")
    tensors: dict[str, np.ndarray] = {}
    site_info = []
    for site_path, module in mods:
        info: dict[str, Any] = {"path": site_path, "kind": type(module).__name__}
        if isinstance(module, LoRA):
            info["scale"] = module.scale
        site_info.append(info)
        for pname, var in _flat(module):
            tensors[f"{site_path}::{pname}"] = np.asarray(var[...])
    config = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "method": method,
        "hparams": json_safe(hparams),
        "targets": targets,
        "sites": site_info,
        "backbone": fingerprint(model),
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    return path


def load_delta(model: nnx.Module, path: str, name: str | None = None, *, active: bool = True,
               check: Callable[[dict[str, Any], nnx.Module, str], None] = check_backbone,
               ) -> tuple[str, str, dict[str, Any], list[str]]:
    """Attach the delta saved at ``path`` to ``model`` (under its saved name, or ``name``);
    returns its ``(name, method, hyper-parameters, targets)``. ``check(saved_fingerprint,
    model, path)`` decides, before any tensor is read, whether the delta's backbone fits
    (default: the same backbone; ``inherit`` accepts a compressed copy of it)."""
    cfg_file, weights_file = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for file in (cfg_file, weights_file):
        if not os.path.isfile(file):
            raise MissingPathError(f"no saved delta at {path}: {os.path.basename(file)} missing")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if cfg.get("format") != FORMAT:
        raise DeltaError(f"{cfg_file} is not a cpmjax delta (format {cfg.get('format')!r})")
    check(cfg["backbone"], model, path)
    spec = get_method(cfg["method"])
    hp = hyperparameters(spec, cfg["hparams"])
    tensors = read_tensors(weights_file)
    name = name or cfg["name"]
    site_paths = [s["path"] for s in cfg["sites"]]
    if spec.name == "lora":  # ranks may differ per site (PEFT rank_pattern): build from shapes
        built = []
        for site in cfg["sites"]:
            a = tensors.get(f"{site['path']}::lora_a")
            b = tensors.get(f"{site['path']}::lora_b")
            if a is None or b is None:
                raise DeltaError(f"{weights_file} lacks the lora tensors of {site['path']}")
            find(model, site["path"])
            built.append((site["path"], LoRA(a.shape[0], b.shape[1], a.shape[1], site["scale"],
                                             param_dtype=a.dtype, rngs=nnx.Rngs(0))))
    else:
        main = [find(model, s["path"]) for s in cfg["sites"] if s["kind"] != PromptStrip.__name__]
        built = spec.build(model, main, hp, nnx.Rngs(0))
    if [p for p, _ in built] != site_paths:
        raise DeltaError(
            f"delta {path} does not fit this model: it has sites {site_paths[:4]}..., rebuilding "
            f"gave {[p for p, _ in built][:4]}..."
        )
    used = set()
    for site_path, module in built:
        for pname, var in _flat(module):
            key = f"{site_path}::{pname}"
            if key not in tensors:
                raise DeltaError(f"{weights_file} lacks tensor {key}")
            value = tensors[key]
            if tuple(value.shape) != tuple(var.shape):
                raise DeltaError(
                    f"tensor {key} in {weights_file} has shape {value.shape}, this model needs "
                    f"{tuple(var.shape)}"
                )
            var.set_value(jnp.asarray(value, dtype=var.dtype))
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise DeltaError(f"{weights_file} has tensors no site uses: {extra[:6]}")
    install(model, name, built, active,
            {"method": spec.name, "hparams": json_safe(hp), "targets": cfg.get("targets", [])})
    return name, spec.name, hp, cfg.get("targets", [])
