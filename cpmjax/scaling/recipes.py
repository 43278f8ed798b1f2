"""Recipe variants: one size of the wind-tunnel family trained at the family's compute with one
ingredient of its recipe changed, for the Densing-Law comparisons (docs/densing.md).

The family's own recipe (:mod:`cpmjax.scaling.family`) is WSD + μP on the mix of local text and
every task's training split; a size's final decay branch has trained
``stable_steps + decay_steps(stable_steps)`` steps. A variant trains the same size for the same
number of steps (the same tokens, so the same compute) from scratch, with:

``cosine``
    a cosine schedule (warmup as the family, then cosine to ``optim.cosine_min_ratio`` of the
    peak at the last step) instead of WSD;
``no-mup``
    the standard parametrization instead of μP, at the family's learning rate (tuned under μP):
    no embedding multiplier (``scale_emb = 1``), residual branches added unscaled
    (``scale_depth = sqrt(layers)``, which makes MiniCPM's ``scale_depth / sqrt(layers)``
    one), no logit division (``dim_model_base = hidden``), one learning rate for every matrix
    (``optim.mup = false``) and the usual ``N(0, 0.02²)`` initialization;
``no-task-split``
    the data mix without the training split of the tasks in ``drop_tasks`` (default every
    task): only local text and the remaining tasks' documents, repeated as often as needed.

``train_variant`` runs one through ``cpmjax.train.train`` (checkpoints, resume, export) under
``<out_dir>/<size>-<variant>`` and records it in ``<out_dir>/variants.json``; ``variant_runs``
reads that index. Variants that need no training (fewer tokens: a shorter decay branch of the
family; compressed models: ``cpmjax.compress``) are measured directly.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from cpmjax.errors import ConfigError, MissingPathError

__all__ = ["RECIPE_VARIANTS", "VARIANTS_FILE", "train_variant", "variant_config",
           "variant_runs"]

VARIANTS_FILE = "variants.json"
RECIPE_VARIANTS = ("cosine", "no-mup", "no-task-split")


def _variant_key(size: str, variant: str, drop_tasks: list[str] | None) -> str:
    if variant == "no-task-split" and drop_tasks:
        return f"{size}-{variant}-{'+'.join(sorted(drop_tasks))}"
    return f"{size}-{variant}"


def variant_config(config: Any, size_name: str, variant: str, *, out_dir: str,
                   drop_tasks: list[str] | None = None) -> Any:
    """The ``cpmjax.train`` config of ``variant`` (one of :data:`RECIPE_VARIANTS`) of the family
    size ``size_name``, trained in ``out_dir`` for as many steps as the size's final branch."""
    from cpmjax.scaling.family import run_config

    if variant not in RECIPE_VARIANTS:
        raise ConfigError(f"unknown recipe variant {variant!r}; choose one of "
                          f"{', '.join(RECIPE_VARIANTS)}")
    size = config.size(size_name)
    stable = config.stable_steps
    decay = config.branches.decay_steps(stable)
    steps = stable + decay
    tc = run_config(config, size, out_dir=out_dir, steps=steps, decay_start=stable,
                    decay_steps=decay, checkpoint_every=max(1, steps // 4), keep=2,
                    export=True)
    tree = tc.model_dump(mode="json")
    if variant == "cosine":
        tree["optim"].update(schedule="cosine", decay_start=None, decay_steps=None)
    elif variant == "no-mup":
        fields = tree["model"]["config"]
        fields.update(scale_emb=1.0, scale_depth=math.sqrt(size.layers),
                      dim_model_base=size.hidden, initializer_range=0.02)
        tree["model"]["init_std"] = 0.02
        tree["optim"]["mup"] = False
    else:
        from cpmjax.scaling.tasks import TASKS

        tasks_all = config.data.tasks or sorted(TASKS)
        dropped = list(drop_tasks) if drop_tasks else list(tasks_all)
        unknown = [t for t in dropped if t not in tasks_all]
        if unknown:
            raise ConfigError(f"drop_tasks: {unknown} not among the family's tasks "
                              f"{tasks_all}")
        # the corpus prepare_family_data writes (train_variant prepares it before training)
        corpus = os.path.join(os.path.abspath(config.out_dir), "corpus")
        tree["data"]["sources"] = (
            [os.path.join(corpus, "text")]
            + [os.path.join(corpus, "tasks", t) for t in tasks_all if t not in dropped])
        tree["data"]["cache_dir"] = os.path.join(out_dir, "data")
    from cpmjax.train.config import TrainConfig

    return TrainConfig(**tree)


def train_variant(config: Any, size_name: str, variant: str, *,
                  drop_tasks: list[str] | None = None, out_dir: str | None = None,
                  progress: bool = True, log: Any = None) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one recipe variant; returns its index record
    (``variant``, ``size``, ``steps``, ``tokens``, losses, ``wall_s``, ``export_dir``,
    ``non_embedding_params``, ``config``)."""
    from cpmjax.scaling.family import (
        _final_train_loss,
        _read_index,
        _save_entry,
        _timed_train,
        non_embedding_params,
        prepare_family_data,
    )

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = os.path.abspath(out_dir or os.path.join(config.out_dir, "variants"))
    key = _variant_key(size_name, variant, drop_tasks)
    record = _read_index(out, VARIANTS_FILE).get("runs", {}).get(key)
    if record and record.get("done"):
        log(f"[recipe variant] {key}: finished before ({record['export_dir']})")
        return record
    prepare_family_data(config, log=log)
    rdir = os.path.join(out, key)
    tc = variant_config(config, size_name, variant, out_dir=rdir, drop_tasks=drop_tasks)
    tc.run.progress = progress
    log(f"[recipe variant] {key}: {tc.run.steps} steps "
        f"({tc.run.steps * config.tokens_per_step:,} tokens)")
    result, wall = _timed_train(tc, export=True)
    record = {"done": not result.stopped_early, "variant": variant, "size": size_name,
              "drop_tasks": drop_tasks, "steps": result.step, "tokens": result.tokens_seen,
              "train_loss": _final_train_loss(rdir), "eval_loss": result.eval_loss,
              "wall_s": wall + (record or {}).get("wall_s", 0.0),
              "export_dir": result.export_dir,
              "non_embedding_params": non_embedding_params(tc),
              "config": tc.model_dump(mode="json")}
    _save_entry(out, "runs", key, record, VARIANTS_FILE)
    return record


def variant_runs(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The finished variants recorded in ``<directory>/variants.json``, by key
    (``<size>-<variant>``)."""
    from cpmjax.scaling.family import _read_index

    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, VARIANTS_FILE)):
        raise MissingPathError(f"no variant index {os.path.join(directory, VARIANTS_FILE)}")
    runs = _read_index(directory, VARIANTS_FILE).get("runs", {})
    return {k: v for k, v in runs.items() if v.get("done")}
