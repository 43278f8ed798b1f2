"""Saving and loading a fused model: one directory ::

    fusion_config.json                 {"format": "cpmjax-ultrafuser", "specialists": [names],
                                        "gate": "mlp", "gate_hidden": 256, "tokenizer": sha256}
    gate.safetensors                   the gate's parameters ("inner.kernel", ... float32)
    specialists/<name>/                each specialist as an HF checkpoint (config.json,
                                        model.safetensors) with its tokenizer files
    tokenizer.json, ...                the shared tokenizer (so ``load_tokenizer(dir)`` works)

Specialists are written with ``cpmjax.hf.save_pretrained`` and read with
``cpmjax.hf.from_pretrained``; the gate with ``cpmjax.safetensors_io``. A directory with a
missing specialist, specialists whose tokenizers differ, or a gate of the wrong shape raises a
typed error naming it, before any weights are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.errors import CheckpointError, ConfigError, MissingPathError, ShapeMismatchError
from cpmjax.fusion.model import FusedLM
from cpmjax.hf import from_pretrained, save_pretrained
from cpmjax.safetensors_io import atomic_directory, read_tensors, save_file

__all__ = [
    "FUSION_CONFIG",
    "FUSION_FORMAT",
    "TOKENIZER_FILES",
    "from_specialist_dirs",
    "is_fused_dir",
    "load_fused",
    "read_fusion_config",
    "save_fused",
    "tokenizer_fingerprint",
]

FUSION_CONFIG = "fusion_config.json"
FUSION_FORMAT = "cpmjax-ultrafuser"
GATE_FILE = "gate.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_fused_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_fused``."""
    return os.path.isfile(os.path.join(os.fspath(path), FUSION_CONFIG))


def tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """sha256 of a checkpoint directory's ``tokenizer.json`` (``None`` when it has none)."""
    file = os.path.join(os.fspath(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    with open(file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_tokenizers(dirs: Sequence[str], names: Sequence[str]) -> str | None:
    prints = [tokenizer_fingerprint(d) for d in dirs]
    known = [(n, p) for n, p in zip(names, prints, strict=True) if p is not None]
    for name, fingerprint in known[1:]:
        if fingerprint != known[0][1]:
            raise ConfigError(
                f"specialist {name!r} has a different tokenizer (tokenizer.json sha256 "
                f"{fingerprint[:12]}) from {known[0][0]!r} ({known[0][1][:12]}): fused "
                "specialists must share one tokenizer")
    return known[0][1] if known else None


def from_specialist_dirs(dirs: Sequence[str | os.PathLike], *, names: Sequence[str] | None = None,
                         gate: str = "mlp", gate_hidden: int | None = None,
                         dtype: str | Any = "float32", seed: int = 0) -> FusedLM:
    """A fused model (fresh gate) over the HF checkpoints ``dirs``. Tokenizers are compared
    (``tokenizer.json``) and every directory checked to exist before any weights are read."""
    dirs = [os.fspath(d) for d in dirs]
    names = list(names) if names is not None else [os.path.basename(os.path.normpath(d))
                                                   for d in dirs]
    for name, d in zip(names, dirs, strict=True):
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise MissingPathError(f"specialist {name!r}: no HF checkpoint at {d}")
    _check_tokenizers(dirs, names)
    specialists = [from_pretrained(d, dtype=dtype) for d in dirs]
    return FusedLM(specialists, gate=gate, names=names, gate_hidden=gate_hidden,
                   rngs=nnx.Rngs(seed))


def save_fused(fused: FusedLM, path: str | os.PathLike, *, tokenizer_dir: str | None = None,
               dtype: str | Any | None = None) -> str:
    """Write ``fused`` to the directory ``path`` (atomically: a failure leaves an earlier save
    untouched). ``tokenizer_dir``: a directory whose tokenizer files are copied beside the
    fused model and into each specialist (default: none copied). ``dtype``: of the specialists'
    weights (the gate stays float32)."""
    path = os.path.abspath(os.fspath(path))
    fingerprint = tokenizer_fingerprint(tokenizer_dir) if tokenizer_dir else None
    with atomic_directory(path, stale=lambda entry: True) as tmp:
        for name, model in zip(fused.names, fused.specialists, strict=True):
            target = os.path.join(tmp, "specialists", name)
            save_pretrained(model, target, dtype=dtype)
            if tokenizer_dir:
                _copy_tokenizer(tokenizer_dir, target)
        if tokenizer_dir:
            _copy_tokenizer(tokenizer_dir, tmp)
        gate_state = nnx.to_flat_state(nnx.state(fused.gate, nnx.Param))
        tensors = {".".join(str(k) for k in key): np.asarray(jax.device_get(var[...]),
                                                              np.float32)
                   for key, var in gate_state}
        save_file(tensors, os.path.join(tmp, GATE_FILE), metadata={"format": "np"})
        config = {"format": FUSION_FORMAT, "specialists": list(fused.names),
                  "gate": fused.gate.kind, "gate_hidden": fused.gate.gate_hidden,
                  "hidden_size": fused.gate.hidden_size, "tokenizer": fingerprint}
        with open(os.path.join(tmp, FUSION_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    return path


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def read_fusion_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``fusion_config.json`` of a fused directory."""
    path = os.fspath(path)
    file = os.path.join(path, FUSION_CONFIG)
    if not os.path.isdir(path):
        raise MissingPathError(f"fused model directory does not exist: {path}")
    if not os.path.isfile(file):
        raise MissingPathError(f"{path} is not a fused model: it has no {FUSION_CONFIG}")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if config.get("format") != FUSION_FORMAT or not config.get("specialists"):
        raise CheckpointError(f"{file} is not a {FUSION_FORMAT} config (format "
                              f"{config.get('format')!r}, specialists "
                              f"{config.get('specialists')!r})")
    return config


def load_fused(path: str | os.PathLike, dtype: str | Any = "float32") -> FusedLM:
    """Load a directory written by ``save_fused``. A missing specialist raises
    ``MissingPathError`` naming it, differing tokenizers ``ConfigError``, a gate file of the
    wrong shape ``ShapeMismatchError``: all before any specialist weights are read."""
    path = os.fspath(path)
    config = read_fusion_config(path)
    names = list(config["specialists"])
    dirs = [os.path.join(path, "specialists", n) for n in names]
    for name, d in zip(names, dirs, strict=True):
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise MissingPathError(f"fused model {path}: specialist {name!r} is missing "
                                   f"(no HF checkpoint at {d})")
    fingerprint = _check_tokenizers(dirs, names)
    if config.get("tokenizer") and fingerprint and fingerprint != config["tokenizer"]:
        raise ConfigError(f"fused model {path}: the specialists' tokenizer differs from the one "
                          f"it was saved with ({FUSION_CONFIG} 'tokenizer')")
    tensors = read_tensors(os.path.join(path, GATE_FILE))
    specialists = [from_pretrained(d, dtype=dtype) for d in dirs]
    fused = FusedLM(specialists, gate=config.get("gate", "mlp"), names=names,
                    gate_hidden=config.get("gate_hidden"))
    flat = nnx.to_flat_state(nnx.state(fused.gate, nnx.Param))
    new_leaves = []
    for key, var in flat:
        name = ".".join(str(k) for k in key)
        if name not in tensors:
            raise CheckpointError(f"{os.path.join(path, GATE_FILE)} lacks tensor {name!r}")
        value = tensors.pop(name)
        if tuple(value.shape) != tuple(var.shape):
            raise ShapeMismatchError(f"gate tensor {name!r} in {path} has shape "
                                     f"{tuple(value.shape)}, the gate expects {tuple(var.shape)}")
        new_leaves.append((key, var.replace(jnp.asarray(value, jnp.float32))))
    if tensors:
        raise CheckpointError(f"{os.path.join(path, GATE_FILE)} has tensors the gate does not "
                              f"use: {sorted(tensors)[:8]}")
    nnx.update(fused.gate, nnx.from_flat_state(new_leaves))
    return fused
