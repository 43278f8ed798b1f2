"""Scaling instruments: the wind tunnel (a family of small MiniCPM models trained with one
recipe, WSD + μP, with decay branches), PassUntil (infinite-resolution task evaluation), task
scaling laws, and the Densing Law (capacity density against the reference family).

Names are imported on first use, so ``import cpmjax.scaling`` stays cheap:

    from cpmjax.scaling import pass_until, pass_until_estimate, fit_task_scaling
    from cpmjax.scaling import train_family, fit_loss_law, fit_score_law, density

See docs/scaling.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of cpmjax.scaling that defines it
_EXPORTS = {
    # tasks.py: the task suite (generated locally, exact checkers)
    "Task": "tasks", "Instance": "tasks", "TASKS": "tasks", "get_task": "tasks",
    "make_task_suite": "tasks", "load_instances": "tasks", "EVAL_TASKS": "tasks",
    "make_text_task": "tasks",
    # passuntil.py: PassUntil sampling and its estimator
    "pass_until": "passuntil", "pass_until_estimate": "passuntil",
    "PassUntilResult": "passuntil", "greedy_accuracy": "passuntil",
    # plots.py: the task scaling law's figure
    "plot_task_scaling": "plots",
    # task_fit.py: task scaling law and accelerated emergence
    "fit_task_scaling": "task_fit", "TaskScaling": "task_fit",
    "accelerated_emergence": "task_fit", "Emergence": "task_fit",
    # family.py: the wind tunnel
    "FamilyConfig": "family", "load_family_config": "family", "train_family": "family",
    "family_runs": "family", "family_heldout_loss": "family",
    "unseen_text_files": "family", "corpus_text_keys": "family", "non_embedding_params": "family", "FamilyRun": "family",
    "FamilyBranch": "family", "lr_sweep": "family", "lr_sweep_results": "family",
    # recipes.py: recipe variants of a family size (Densing-Law comparisons)
    "train_variant": "recipes", "variant_config": "recipes", "variant_runs": "recipes",
    "RECIPE_VARIANTS": "recipes",
    # densing.py: the Densing Law
    "conditional_loss": "densing", "fit_loss_law": "densing", "LossLaw": "densing",
    "fit_score_law": "densing", "ScoreLaw": "densing", "effective_params": "densing",
    "density": "densing", "DensityEstimate": "densing", "fit_density_trend": "densing",
    "DensityTrend": "densing", "nonzero_params": "densing",
    "loss_density": "densing", "text_loss_per_byte": "densing", "text_chunks": "densing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cpmjax.scaling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cpmjax.scaling.{module}"), name)
    globals()[name] = value
    return value
