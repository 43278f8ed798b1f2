"""The task scaling law and accelerated emergence (Hu et al., 2023).

The task scaling law says a task's pass rate grows with the non-embedding size ``N`` as

    PU(N) = exp(-c * N^-alpha),   i.e.   F(N) = log(-log PU) = log c - alpha * log N,

a straight line in ``(log N, F)``. :func:`fit_task_scaling` fits it by ordinary least squares
in those coordinates (``scipy.stats.linregress``: slope, intercept and their standard errors),
either on the dataset's mean PU per size (``level="dataset"``) or on every instance separately
(``level="instance"``), the dataset's PU then predicted as the (weighted) mean over instances of
their predicted PU, as the paper does: a mean of exponentials of power laws is not itself one.

:func:`accelerated_emergence` tests whether ``F`` bends away from the straight line: it fits
``F = a + b x + q x^2`` with ``x`` the centred ``log N`` (least squares, ``scipy.optimize.
curve_fit``, which is exact for a linear model) and calls the curvature significant when the
two-sided t-test of ``q = 0`` (``sizes - 3`` degrees of freedom) rejects at ``level``.
``q < 0`` (concave ``F``: ``-log PU`` falling faster than any power law) is accelerated
emergence; ``q > 0`` is growth slower than the law.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from cpmjax.errors import FitError

__all__ = ["Emergence", "TaskScaling", "accelerated_emergence", "fit_task_scaling"]

LEVELS = ("dataset", "instance")


@dataclasses.dataclass(frozen=True)
class TaskScaling:
    """A fitted task scaling law ``PU(N) = exp(-c N^-alpha)``.

    ``level="dataset"``: ``c``, ``alpha`` and their standard errors are floats, ``r2`` the
    coefficient of determination of the line in ``(log N, log(-log PU))``.
    ``level="instance"``: ``c``, ``alpha``, ``c_stderr``, ``alpha_stderr`` are arrays
    ``[instances]`` (one law per instance), ``weights`` their normalised weights, and ``r2``
    is that of the predicted dataset PU against the observed mean PU, in the same
    coordinates. ``c_stderr`` comes from the intercept's by the delta method
    (``c * se(log c)``)."""

    level: str
    c: Any
    alpha: Any
    c_stderr: Any
    alpha_stderr: Any
    r2: float
    n_params: np.ndarray
    pass_rates: np.ndarray
    weights: np.ndarray | None = None

    def predict(self, n_params: Any) -> np.ndarray:
        """Predicted dataset PU at the sizes ``n_params`` (scalar or array)."""
        n = np.asarray(n_params, np.float64)
        if np.any(~np.isfinite(n)) or np.any(n <= 0):
            raise FitError(f"n_params must be positive sizes, got {n_params!r}")
        if self.level == "dataset":
            return np.exp(-self.c * n ** (-self.alpha))
        c = np.asarray(self.c)[..., None]
        alpha = np.asarray(self.alpha)[..., None]
        per_instance = np.exp(-c * n.reshape(-1)[None, :] ** (-alpha))  # [instances, sizes]
        return (self.weights @ per_instance).reshape(n.shape)

    def prediction_interval(self, n_params: Any, confidence: float = 0.95
                            ) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` PU at ``n_params`` within which a new measurement of a model of that
        size falls with probability ``confidence`` if the law holds with the scatter seen in the
        fit: the OLS prediction interval of ``F = log(-log PU)`` on ``log N``,
        ``F0 ± t_(k-2) · s · sqrt(1 + 1/k + (x0 - mean x)^2 / Sxx)``, mapped back through the
        decreasing ``PU = exp(-exp(F))``. Dataset level only."""
        from scipy.stats import t as student_t

        if self.level != "dataset":
            raise FitError("prediction_interval needs a dataset-level fit (the instance-level "
                           "prediction is a mean of laws, not one line)")
        if not 0.0 < float(confidence) < 1.0:
            raise FitError(f"confidence must be in (0, 1), got {confidence}")
        n = np.asarray(n_params, np.float64)
        if np.any(~np.isfinite(n)) or np.any(n <= 0):
            raise FitError(f"n_params must be positive sizes, got {n_params!r}")
        x = np.log(self.n_params)
        y = np.log(-np.log(self.pass_rates))
        k = x.size
        fitted = np.log(self.c) - self.alpha * x
        spread = np.sqrt(np.sum((y - fitted) ** 2) / (k - 2))
        x0 = np.log(n)
        se = spread * np.sqrt(1 + 1 / k + (x0 - x.mean()) ** 2 / np.sum((x - x.mean()) ** 2))
        q = student_t.ppf(0.5 + float(confidence) / 2, k - 2)
        f0 = np.log(self.c) - self.alpha * x0
        return np.exp(-np.exp(f0 + q * se)), np.exp(-np.exp(f0 - q * se))

    def to_json(self) -> dict[str, Any]:
        def plain(x: Any) -> Any:
            return np.asarray(x).tolist() if x is not None else None

        return {"level": self.level, "c": plain(self.c), "alpha": plain(self.alpha),
                "c_stderr": plain(self.c_stderr), "alpha_stderr": plain(self.alpha_stderr),
                "r2": self.r2, "n_params": plain(self.n_params),
                "pass_rates": plain(self.pass_rates), "weights": plain(self.weights)}


@dataclasses.dataclass(frozen=True)
class Emergence:
    """The curvature ``q`` of ``F(N) = log(-log PU)`` against centred ``log N``
    (``F = a + b x + q x^2``), its standard error, t statistic and two-sided p-value;
    ``significant``: ``p_value < level``; ``accelerated``: significant and ``q < 0``."""

    curvature: float
    stderr: float
    t: float
    p_value: float
    level: float
    significant: bool
    accelerated: bool
    coefficients: tuple[float, float, float]  # (a, b, q)
    center: float  # the mean log N that x is centred on

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_sizes(n_params: Any, pass_rates: Any, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n_params, np.float64)
    rates = np.asarray(pass_rates, np.float64)
    if n.ndim != 1:
        raise FitError(f"n_params must be one size per model, got shape {n.shape}")
    if rates.ndim not in (1, 2) or rates.shape[0] != n.shape[0]:
        raise FitError(
            f"pass_rates must be [sizes] or [sizes, instances] with one row per size: got shape "
            f"{rates.shape} for {n.shape[0]} sizes (mismatched lengths)")
    if n.shape[0] < minimum:
        raise FitError(f"need at least {minimum} model sizes, got {n.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(n) | (n <= 0))
    if bad.size:
        raise FitError(f"size {int(bad[0])} is {n[bad[0]]!r}: sizes must be positive")
    if np.unique(n).size < n.size:
        raise FitError(f"sizes repeat: {n.tolist()}")
    return n, rates


def _check_rates(n: np.ndarray, rates: np.ndarray) -> None:
    """Every rate strictly inside (0, 1): ``log(-log PU)`` is infinite at 0 and 1."""
    bad = np.argwhere(~np.isfinite(rates) | (rates <= 0) | (rates >= 1))
    if bad.size:
        where = bad[0]
        value = rates[tuple(where)]
        name = f"size {n[where[0]]:g}" + (f", instance {int(where[1])}" if rates.ndim == 2
                                            else "")
        raise FitError(
            f"pass rate {value!r} at {name} is outside (0, 1): log(-log PU) is undefined; "
            "sample more (PassUntil max_samples) or leave that size/instance out")


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float]:
    """``(slope, intercept, slope_stderr, intercept_stderr, r2)`` of OLS ``y ~ x``."""
    from scipy.stats import linregress

    fit = linregress(x, y)
    return (float(fit.slope), float(fit.intercept), float(fit.stderr),
            float(fit.intercept_stderr), float(fit.rvalue ** 2))


def _weights(instance_weights: Any, count: int) -> np.ndarray:
    if instance_weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(instance_weights, np.float64)
    if w.shape != (count,):
        raise FitError(f"instance_weights has shape {w.shape}, need ({count},) (one weight "
                         "per instance: mismatched lengths)")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise FitError(f"instance_weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


def fit_task_scaling(
    n_params: Any,
    pass_rates: Any,
    *,
    level: str = "dataset",
    instance_weights: Any = None,
) -> TaskScaling:
    """Fit ``PU(N) = exp(-c N^-alpha)`` to pass rates of models of sizes ``n_params``.

    ``n_params``: ``[sizes]`` non-embedding parameter counts. ``pass_rates``: ``[sizes]``
    dataset PU, or ``[sizes, instances]`` per-instance PU (``level="dataset"`` then fits their
    weighted mean per size; ``level="instance"`` needs them). ``instance_weights``:
    ``[instances]`` (default: equal). Typed errors (``FitError``) for fewer than 3 sizes,
    non-positive or repeated sizes, mismatched lengths, and any pass rate of 0 or 1 (naming the
    size and instance)."""
    if level not in LEVELS:
        raise FitError(f"level must be one of {LEVELS}, got {level!r}")
    n, rates = _check_sizes(n_params, pass_rates, 3)
    if level == "instance" and rates.ndim != 2:
        raise FitError("level='instance' needs pass_rates of shape [sizes, instances], got "
                         f"shape {rates.shape}")
    x = np.log(n)
    if rates.ndim == 2:
        weights = _weights(instance_weights, rates.shape[1])
    elif instance_weights is not None:
        raise FitError("instance_weights given with dataset-level pass_rates [sizes]")
    if level == "dataset":
        mean = rates @ weights if rates.ndim == 2 else rates
        _check_rates(n, mean)
        slope, intercept, slope_se, intercept_se, r2 = _line(x, np.log(-np.log(mean)))
        c = float(np.exp(intercept))
        return TaskScaling(level="dataset", c=c, alpha=-slope, c_stderr=c * intercept_se,
                           alpha_stderr=slope_se, r2=r2, n_params=n, pass_rates=mean)
    _check_rates(n, rates)
    fits = np.array([_line(x, np.log(-np.log(rates[:, i]))) for i in range(rates.shape[1])])
    c = np.exp(fits[:, 1])
    law = TaskScaling(level="instance", c=c, alpha=-fits[:, 0], c_stderr=c * fits[:, 3],
                      alpha_stderr=fits[:, 2], r2=float("nan"), n_params=n, pass_rates=rates,
                      weights=weights)
    observed = np.log(-np.log(np.clip(rates @ weights, 1e-300, 1 - 1e-16)))
    predicted = np.log(-np.log(law.predict(n)))
    total = np.sum((observed - observed.mean()) ** 2)
    r2 = 1.0 - np.sum((observed - predicted) ** 2) / total if total > 0 else 1.0
    return dataclasses.replace(law, r2=float(r2))


def accelerated_emergence(n_params: Any, pass_rates: Any, *, level: float = 0.05) -> Emergence:
    """The curvature of ``F(N) = log(-log PU)`` against ``log N`` and whether it is
    significant (see the module docstring). ``pass_rates``: ``[sizes]`` dataset PU (or
    ``[sizes, instances]``, averaged per size). Needs at least 4 sizes (3 coefficients and
    one degree of freedom for the error); typed errors as :func:`fit_task_scaling`."""
    from scipy.optimize import OptimizeWarning, curve_fit
    from scipy.stats import t as student_t

    if not 0.0 < float(level) < 1.0:
        raise FitError(f"level must be in (0, 1), got {level}")
    n, rates = _check_sizes(n_params, pass_rates, 4)
    if rates.ndim == 2:
        rates = rates.mean(axis=1)
    _check_rates(n, rates)
    log_n = np.log(n)
    center = float(log_n.mean())
    x = log_n - center
    y = np.log(-np.log(rates))

    def quadratic(x, a, b, q):
        return a + b * x + q * x * x

    with warnings.catch_warnings():  # an exact fit has no residual to estimate an error from
        warnings.simplefilter("ignore", OptimizeWarning)
        coefficients, covariance = curve_fit(quadratic, x, y, p0=(float(y.mean()), 0.0, 0.0))
    q = float(coefficients[2])
    dof = n.size - 3
    residual = y - quadratic(x, *coefficients)
    if np.allclose(residual, 0.0, atol=1e-12 * max(1.0, float(np.abs(y).max()))):
        stderr = 0.0  # an exact fit: curve_fit reports an infinite covariance
    else:
        stderr = float(np.sqrt(covariance[2, 2]))
    if stderr > 0:
        t_value = q / stderr
        p_value = float(2 * student_t.sf(abs(t_value), dof))
    else:
        bent = abs(q) > 1e-9 * (1.0 + float(np.abs(y).max()))  # beyond rounding
        t_value = float("inf") if bent else 0.0
        p_value = 0.0 if bent else 1.0
    significant = p_value < level
    return Emergence(curvature=q, stderr=stderr, t=float(t_value), p_value=p_value,
                     level=float(level), significant=bool(significant),
                     accelerated=bool(significant and q < 0),
                     coefficients=tuple(float(v) for v in coefficients), center=center)
