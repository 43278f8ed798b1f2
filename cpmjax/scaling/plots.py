"""Figures of the task scaling law: PU against N on log axes, the fitted law, and a prediction.

matplotlib with the non-interactive Agg backend (no display needed)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cpmjax.scaling.task_fit import TaskScaling

__all__ = ["plot_task_scaling"]


def plot_task_scaling(
    law: TaskScaling,
    path: str | os.PathLike,
    *,
    low: Any = None,
    high: Any = None,
    predict: float | None = None,
    labels: Any = None,
    title: str | None = None,
) -> str:
    """Save a figure of the dataset PU per size (points, with ``low``/``high`` error bars when
    given, ``[sizes]``), the fitted law over the measured range (extended to ``predict``), and
    the predicted PU at ``predict`` (a star; for a dataset-level law with its 95% prediction
    interval). ``labels``: a name per size. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.asarray(law.n_params, np.float64)
    observed = np.asarray(law.pass_rates, np.float64)
    if observed.ndim == 2:
        observed = observed @ law.weights
    span = [n.min(), n.max()] + ([float(predict)] if predict else [])
    grid = np.geomspace(min(span) / 1.5, max(span) * 1.5, 200)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if low is not None and high is not None:
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        yerr = np.stack([np.maximum(observed - low, 0), np.maximum(high - observed, 0)])
        ax.errorbar(n, observed, yerr=yerr, fmt="o", color="C0", capsize=3,
                    label="PassUntil PU")
    else:
        ax.plot(n, observed, "o", color="C0", label="PassUntil PU")
    if labels is not None:
        for x, y, text in zip(n, observed, labels, strict=True):
            ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    if law.level == "dataset":
        fit_label = f"fit: exp(-{law.c:.3g} N^-{law.alpha:.3g}), R²={law.r2:.3f}"
    else:
        fit_label = f"instance-level fit (mean of {np.size(law.c)} laws), R²={law.r2:.3f}"
    ax.plot(grid, law.predict(grid), "-", color="C1", label=fit_label)
    if predict:
        value = float(law.predict(float(predict)))
        label = f"prediction at N={float(predict):.3g}: PU={value:.3g}"
        if law.level == "dataset":  # with its 95% prediction interval
            low_p, high_p = (float(v) for v in law.prediction_interval(float(predict)))
            ax.errorbar([predict], [value], yerr=[[value - low_p], [high_p - value]],
                        fmt="none", ecolor="C3", capsize=4)
            label += f" [{low_p:.3g}, {high_p:.3g}]"
        ax.plot([predict], [value], "*", color="C3", markersize=14, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("pass rate PU")
    ax.set_title(title or "Task scaling law")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
