"""Knowledge inheritance (CPET): load a delta trained on the uncompressed backbone onto a
compressed copy of it.

A saved delta's fingerprint records its backbone's config hash and a hash of every parameter's
path and shape. Compression changes the second on purpose (quantized kernels are no longer
parameters, pruning masks and MoEfication routers are added), so ``load`` would refuse. For a
compressed model a delta *fits* when

- the architecture is the same: the config hash matches (a different backbone raises
  ``DeltaError`` naming the differing config keys), and
- every site of the delta exists in the compressed model and its tensors have the shapes the
  rebuilt delta needs (checked by the ordinary loader).

The loaded modules record where they came from in their metadata: ``inherited_from`` (the
directory), ``source_backbone`` (the saved fingerprint's hashes) and ``compression`` (the
compressed model's ``compression`` record, a JSON text set by ``cpmjax.compress``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from flax import nnx

from cpmjax.delta._api import Delta
from cpmjax.delta._io import fingerprint, load_delta
from cpmjax.delta._sites import delta_modules
from cpmjax.errors import DeltaError


def check_same_architecture(saved: dict[str, Any], model: nnx.Module, source: str) -> None:
    """Raise ``DeltaError`` unless ``model`` has the architecture the saved fingerprint names."""
    here = fingerprint(model)
    if saved.get("model_class") != here["model_class"]:
        raise DeltaError(
            f"delta {source} was trained on a different backbone: {saved.get('model_class')} vs "
            f"{here['model_class']}"
        )
    if saved.get("config_hash") != here["config_hash"]:
        a, b = saved.get("config") or {}, here["config"] or {}
        diff = [f"{k}: delta={a.get(k)!r} model={b.get(k)!r}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise DeltaError(
            f"delta {source} was trained on a different backbone (config hash "
            f"{saved.get('config_hash')} vs {here['config_hash']}); differences: "
            f"{'; '.join(diff[:6])}"
        )


def inherit(delta_dir: str, compressed_model: nnx.Module, name: str | None = None, *,
            active: bool = True) -> Delta:
    """Attach the delta saved at ``delta_dir`` (trained on the uncompressed backbone) to
    ``compressed_model`` (the same architecture after ``cpmjax.compress``); returns its handle.

    Raises ``DeltaError`` when the delta was trained on a different architecture, before any
    tensor is read."""
    path, model = delta_dir, compressed_model
    saved: dict[str, Any] = {}

    def check(fingerprint_saved: dict[str, Any], model: nnx.Module, source: str) -> None:
        check_same_architecture(fingerprint_saved, model, source)
        saved.update(fingerprint_saved)

    loaded = load_delta(model, path, name, active=active, check=check)
    record = {
        "inherited_from": os.path.abspath(path),
        "source_backbone": {k: saved.get(k) for k in ("config_hash", "structure_hash",
                                                       "num_params")},
        "compression": json.loads(getattr(model, "compression", None) or "null"),
    }
    for _, module in delta_modules(model, loaded[0]):
        module.meta = json.dumps({**json.loads(module.meta or "{}"), **record}, sort_keys=True,
                                 default=str)
    return Delta(model, *loaded)
