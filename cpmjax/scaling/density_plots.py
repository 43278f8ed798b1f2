"""Figures of the Densing Law (matplotlib, Agg backend; each function writes one PNG and returns
its path):

- :func:`plot_loss_law`: loss against non-embedding parameters, one colour per token budget,
  with the fitted ``a·N^-α + b·D^-β`` for each budget;
- :func:`plot_score_law`: score against loss with the fitted sigmoid (and measured models);
- :func:`plot_densities`: one bar per model, its density with the bootstrap interval, and the
  reference line ``ρ = 1``;
- :func:`plot_density_trend`: dated densities (log scale) with the fitted ``ln ρ = A·t + B``
  (and the two sides of a breakpoint).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cpmjax.scaling.densing import DensityTrend, LossLaw, ScoreLaw

__all__ = ["plot_densities", "plot_density_trend", "plot_loss_law", "plot_score_law"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_loss_law(n_params: Sequence[float], n_tokens: Sequence[float], loss: Sequence[float],
                  law: LossLaw, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Loss against ``N`` (log x), one colour per token budget ``D``, with the fitted law."""
    plt = _pyplot()
    n = np.asarray(n_params, np.float64)
    d = np.asarray(n_tokens, np.float64)
    y = np.asarray(loss, np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = np.unique(d)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
    for budget, colour in zip(budgets, colours, strict=True):
        mine = d == budget
        ax.scatter(n[mine], y[mine], color=colour, s=18, label=f"D = {budget:.3g}")
        ax.plot(grid, law.predict(grid, budget), color=colour, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("loss")
    ax.set_title(title or f"L = {law.a:.3g}·N^-{law.alpha:.3g} + {law.b:.3g}·D^-{law.beta:.3g}"
                 f"  (R² {law.r2:.3f})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_score_law(loss: Sequence[float], score: Sequence[float], law: ScoreLaw,
                   path: str | os.PathLike, *, models: dict[str, tuple[float, float]] | None = None,
                   title: str | None = None) -> str:
    """Score against loss with the fitted sigmoid; ``models`` maps a name to its ``(loss,
    score)`` point (the loss its score implies), marked and labelled."""
    plt = _pyplot()
    x = np.asarray(loss, np.float64)
    y = np.asarray(score, np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x, y, s=18, color="tab:blue", label="reference family")
    span = max(float(np.ptp(x)), 1e-9)
    grid = np.linspace(x.min() - 0.25 * span, x.max() + 0.25 * span, 200)
    ax.plot(grid, law.predict(grid), color="tab:blue", lw=1)
    for name, (model_loss, model_score) in (models or {}).items():
        if math.isfinite(model_loss):
            ax.scatter([model_loss], [model_score], marker="*", s=80, color="tab:red")
            ax.annotate(name, (model_loss, model_score), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        else:
            ax.axhline(model_score, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("loss")
    ax.set_ylabel("score")
    ax.set_title(title or f"S = {law.c:.3g} / (1 + exp(-({law.gamma:.3g})(L - {law.l:.3g}))) "
                 f"+ {law.d:.3g}  (R² {law.r2:.3f})", fontsize=9)
    return _save(fig, path)


def plot_densities(names: Sequence[str], densities: Sequence[float],
                   intervals: Sequence[tuple[float, float] | None], path: str | os.PathLike, *,
                   title: str = "capacity density against the reference family") -> str:
    """One bar per model (log y) with its interval; an unbounded end is drawn to the axis edge
    with an arrow-less open bar; the line ``ρ = 1`` is the reference family itself."""
    plt = _pyplot()
    rho = np.asarray(densities, np.float64)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 4))
    positions = np.arange(len(names))
    finite = rho[np.isfinite(rho) & (rho > 0)]
    ends = [v for iv in intervals if iv for v in iv if math.isfinite(v) and v > 0]
    values = np.concatenate([finite, np.asarray(ends, np.float64), [1.0]])
    bottom, top = values.min() / 3, values.max() * 3
    heights = np.clip(np.where(np.isfinite(rho), rho, top), bottom, top)
    ax.bar(positions, heights, color="tab:green", alpha=0.7)
    for i, iv in enumerate(intervals):
        if iv is None:
            continue
        lo = min(max(iv[0], bottom), top) if math.isfinite(iv[0]) else top
        hi = min(iv[1], top) if math.isfinite(iv[1]) else top
        ax.plot([i, i], [max(lo, bottom), hi], color="black", lw=1.5)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xticks(positions, list(names), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("density ρ = N̂ / N")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _to_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        return dt.date.fromisoformat(value.strip()[:10])
    return dt.date(1970, 1, 1) + dt.timedelta(days=float(value))


def plot_density_trend(dates: Sequence[Any], densities: Sequence[float], trend: DensityTrend,
                       path: str | os.PathLike, *, names: Sequence[str] | None = None,
                       title: str | None = None) -> str:
    """Densities (log y) against date with the fitted line; with a breakpoint, the fits before
    and after it dashed and a vertical line at the breakpoint."""
    plt = _pyplot()
    when = [_to_date(v) for v in dates]
    rho = np.asarray(densities, np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(when, rho, s=18, color="tab:blue", zorder=3)
    for name, day, value in zip(names or [], when, rho, strict=False):
        ax.annotate(name, (day, value), fontsize=6, xytext=(3, 3), textcoords="offset points")
    origin = _to_date(trend.origin)

    def line(fit: DensityTrend, start: dt.date, end: dt.date, **style: Any) -> None:
        days = np.linspace((start - origin).days, (end - origin).days, 50)
        xs = [origin + dt.timedelta(days=float(t)) for t in days]
        ax.plot(xs, np.exp(fit.A * days + fit.B), **style)

    first, last = min(when), max(when)
    line(trend, first, last, color="tab:blue", lw=1.2,
         label=f"A = {trend.A:.4g}/day, doubling {trend.doubling_days:.0f} days, "
               f"R² {trend.r2:.2f}")
    if trend.breakpoint is not None and trend.pre is not None and trend.post is not None:
        cut = _to_date(trend.breakpoint)
        ax.axvline(cut, color="gray", lw=0.8, ls=":")
        line(trend.pre, first, cut, color="tab:orange", lw=1, ls="--",
             label=f"before: doubling {trend.pre.doubling_days:.0f} days")
        line(trend.post, cut, last, color="tab:red", lw=1, ls="--",
             label=f"after: doubling {trend.post.doubling_days:.0f} days")
    ax.set_yscale("log")
    ax.set_xlabel("release date")
    ax.set_ylabel("capacity density ρ")
    ax.set_title(title or "ln ρ = A·t + B", fontsize=9)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _save(fig, path)
