"""The Densing Law estimator on synthetic ground truth: the two fits recover known parameters,
score -> N̂ -> score round trips, the bootstrap interval covers the truth at about its level,
the density trend recovers its slope, bad input raises typed errors; the conditional loss
equals a direct log-softmax and HF transformers; both CLI commands on a fabricated family."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import types

import numpy as np
import pytest

from cpmjax.errors import EmptyPromptError, FitError, InputError, OutOfRangeError
from cpmjax.scaling import (
    DensityTrend,
    LossLaw,
    ScoreLaw,
    densing,
    density,
    effective_params,
    fit_density_trend,
    fit_loss_law,
    fit_score_law,
)

# a Chinchilla-like loss law (without its constant) and a sigmoid whose transition the family
# spans
LOSS_TRUTH = dict(a=406.4, alpha=0.34, b=410.7, beta=0.28)
SCORE_TRUTH = dict(c=0.9, gamma=-3.0, l=2.0, d=0.05)


def _grid(sizes=6, budgets=4):
    n = np.repeat(np.geomspace(1e6, 1e9, sizes), budgets)
    d = np.tile(np.geomspace(1e8, 1e11, budgets), sizes)
    return n, d


def _loss(n, d, a, alpha, b, beta):
    return a * n ** -alpha + b * d ** -beta


def _score(x, c, gamma, l, d):  # noqa: E741
    return c / (1 + np.exp(-gamma * (x - l))) + d


def _family(seed, loss_noise=0.01, score_noise=0.01):
    rng = np.random.default_rng(seed)
    n, d = _grid()
    true_loss = _loss(n, d, **LOSS_TRUTH)
    loss = true_loss * np.exp(loss_noise * rng.standard_normal(n.shape))
    score = _score(true_loss, **SCORE_TRUTH) + score_noise * rng.standard_normal(n.shape)
    return n, d, loss, score, rng


def _close(fitted, truth, rtol):
    for name, value in truth.items():
        assert getattr(fitted, name) == pytest.approx(value, rel=rtol), name


# --- the fits -------------------------------------------------------------------------------


def test_loss_law_recovers_parameters():
    n, d = _grid()
    exact = fit_loss_law(n, d, _loss(n, d, **LOSS_TRUTH))
    _close(exact, LOSS_TRUTH, 1e-6)
    assert exact.r2 == pytest.approx(1.0)
    # noisy (0.2% multiplicative): within 5%, and within 4 standard errors
    rng = np.random.default_rng(1)
    noisy = fit_loss_law(n, d, _loss(n, d, **LOSS_TRUTH) * np.exp(
        0.002 * rng.standard_normal(n.shape)))
    _close(noisy, LOSS_TRUTH, 0.05)
    for name, value in LOSS_TRUTH.items():
        assert abs(getattr(noisy, name) - value) < 4 * noisy.stderr[name], name
    assert noisy.r2 > 0.99
    # predict / inverse_params are inverses of each other
    for size in (3e6, 2e8):
        loss = noisy.predict(size, 1e10)
        assert noisy.inverse_params(loss, 1e10) == pytest.approx(size, rel=1e-9)


def test_loss_law_from_bad_starts_and_other_truths():
    """The multi-start search finds other exponents too, far from the usual ones."""
    n, d = _grid(5, 3)
    for truth in (dict(a=50.0, alpha=0.9, b=3.0, beta=0.05),
                  dict(a=2.0, alpha=0.07, b=5e3, beta=0.6)):
        fit = fit_loss_law(n, d, _loss(n, d, **truth))
        _close(fit, truth, 1e-4)


def test_score_law_recovers_parameters():
    x = np.linspace(0.8, 3.5, 30)
    exact = fit_score_law(x, _score(x, **SCORE_TRUTH))
    _close(exact, SCORE_TRUTH, 1e-6)
    rng = np.random.default_rng(2)
    noisy = fit_score_law(x, _score(x, **SCORE_TRUTH) + 0.005 * rng.standard_normal(x.shape))
    _close(noisy, SCORE_TRUTH, 0.05)
    assert noisy.r2 > 0.99
    # a score that rises with the loss (γ > 0) is fitted with c > 0 too
    rising = dict(c=0.5, gamma=4.0, l=2.5, d=0.2)
    fit = fit_score_law(x, _score(x, **rising))
    _close(fit, rising, 1e-6)
    for s in (0.25, 0.45, 0.69):
        assert fit.predict(fit.inverse(s)) == pytest.approx(s, abs=1e-12)


def test_score_law_bounded_to_the_score_range():
    """Scores bounded to [0, 1]: the fit stays in the range (unbounded, tail-only data run off
    to an exponential with an arbitrary c), recovers an exact tail-only law, holds parameters
    that end on a bound fixed (zero standard error), and changes nothing when the bounds are
    not touched. From noisy tail-only scores c is NOT determined (docs/densing.md)."""
    truth = dict(c=1.0, gamma=-3.0, l=2.0, d=0.0)
    x = np.linspace(2.8, 4.0, 12)  # scores 0.002 .. 0.08: the lower tail only
    exact = fit_score_law(x, _score(x, **truth), score_range=(0.0, 1.0))
    _close(exact, dict(c=1.0, gamma=-3.0, l=2.0), 1e-6)
    assert abs(exact.d) < 1e-9 and exact.stderr["d"] == 0.0
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        noisy = fit_score_law(x, _score(x, **truth) * np.exp(0.02 * rng.standard_normal(
            x.shape)), score_range=(0.0, 1.0))
        assert 0.0 <= noisy.d and noisy.c + noisy.d <= 1.0 + 1e-12
        assert noisy.gamma == pytest.approx(-3.0, rel=0.15) and noisy.r2 > 0.99
    x = np.linspace(0.8, 3.5, 30)
    inner = fit_score_law(x, _score(x, **SCORE_TRUTH), score_range=(0.0, 1.0))
    _close(inner, SCORE_TRUTH, 1e-6)
    with pytest.raises(FitError, match=r"score\[0\] = 1.5 lies outside score_range"):
        fit_score_law([1, 2, 3, 4], [1.5, 0.5, 0.2, 0.1], score_range=(0, 1))
    with pytest.raises(FitError, match="need finite low < high"):
        fit_score_law([1, 2, 3, 4], [0.9, 0.5, 0.2, 0.1], score_range=(1, 0))


def test_score_law_with_held_floor_and_ceiling():
    """Holding the floor d and/or the ceiling c + d: tail-only scores determine the free
    parameters (exactly from exact data, within 5% from noise), the law reports the held values
    with standard error 0, round trips score -> N̂ -> score hold, and the bootstrap draws keep
    the held values exactly."""
    lower = dict(c=1.0, gamma=-3.0, l=2.0, d=0.0)       # scores 0.002 .. 0.3: lower tail
    x_low = np.linspace(2.3, 4.0, 12)
    upper = dict(c=0.8, gamma=-3.0, l=2.0, d=0.1)       # scores 0.6 .. 0.9: upper tail
    x_up = np.linspace(0.3, 1.6, 12)
    cases = [(x_low, lower, dict(floor=0.0, ceiling=1.0)), (x_low, lower, dict(floor=0.0)),
             (x_low, lower, dict(ceiling=1.0)), (x_up, upper, dict(ceiling=0.9)),
             (x_up, upper, dict(floor=0.1, ceiling=0.9))]
    for x, truth, hold in cases:
        fit = fit_score_law(x, _score(x, **truth), score_range=(0.0, 1.0), **hold)
        _close(fit, dict(c=truth["c"], gamma=truth["gamma"], l=truth["l"]), 1e-6)
        assert abs(fit.d - truth["d"]) < 1e-6
        assert fit.held == hold and fit.to_dict()["held"] == hold
        if "floor" in hold:
            assert fit.d == hold["floor"] and fit.stderr["d"] == 0.0
        if "ceiling" in hold:
            assert fit.c + fit.d == pytest.approx(hold["ceiling"], abs=1e-15)
            assert fit.stderr["ceiling"] == 0.0
    # noisy scores, both asymptotes held (tail only) / the floor held (across the middle)
    rng = np.random.default_rng(12)
    noisy = fit_score_law(x_low, _score(x_low, **lower) * np.exp(
        0.02 * rng.standard_normal(x_low.shape)), score_range=(0.0, 1.0), floor=0.0, ceiling=1.0)
    _close(noisy, dict(gamma=-3.0, l=2.0), 0.05)
    assert noisy.stderr["c"] == noisy.stderr["d"] == 0.0 and noisy.stderr["gamma"] > 0
    x = np.linspace(0.8, 3.5, 30)
    noisy = fit_score_law(x, _score(x, **SCORE_TRUTH) + 0.005 * rng.standard_normal(x.shape),
                          floor=SCORE_TRUTH["d"])
    _close(noisy, SCORE_TRUTH, 0.05)
    # without score_range too, and the unbounded fit of the same data agrees
    free = fit_score_law(x, _score(x, **SCORE_TRUTH), ceiling=0.95)
    _close(free, SCORE_TRUTH, 1e-6)
    # round trip with held parameters; draws keep them
    n, d = _grid()
    loss = _loss(n, d, **LOSS_TRUTH)
    loss_law = fit_loss_law(n, d, loss * np.exp(0.01 * rng.standard_normal(n.shape)))
    for hold in (dict(floor=0.05), dict(ceiling=0.95), dict(floor=0.05, ceiling=0.95)):
        score = _score(loss, **SCORE_TRUTH) + 0.01 * rng.standard_normal(n.shape)
        law = fit_score_law(loss, score, score_range=(0.0, 1.0), **hold)
        lo, hi = law.reachable
        for s in np.linspace(lo + 0.05 * (hi - lo), hi - 0.3 * (hi - lo), 5):
            n_hat = effective_params(s, loss_law, law, 3e10)
            assert abs(law.predict(loss_law.predict(n_hat, 3e10)) - s) < 1e-6
        est = density(float(np.median(score)), 1e7, loss_law, law, 3e10, samples=300)
        assert est.density_interval is not None
        draws = densing._hold(densing._draw(densing._theta_score(law), law.covariance, 300,
                                            np.random.default_rng(0)), law.held)
        if "floor" in hold:
            assert np.all(draws[:, 3] == hold["floor"])
        if "ceiling" in hold:
            assert np.allclose(np.exp(draws[:, 0]) + draws[:, 3], hold["ceiling"], atol=1e-12,
                               rtol=0)
        assert np.std(draws[:, 1]) > 0  # γ is still drawn


def test_score_law_held_values_errors():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [0.9, 0.7, 0.4, 0.2, 0.1]
    with pytest.raises(FitError, match="floor=0.5 is not below ceiling=0.5"):
        fit_score_law(x, y, floor=0.5, ceiling=0.5)
    with pytest.raises(FitError, match="floor=0.9 is not below ceiling=0.2"):
        fit_score_law(x, y, floor=0.9, ceiling=0.2)
    with pytest.raises(FitError, match=r"ceiling=1.5 lies outside score_range"):
        fit_score_law(x, y, score_range=(0, 1), ceiling=1.5)
    with pytest.raises(FitError, match=r"floor=-0.1 lies outside score_range"):
        fit_score_law(x, y, score_range=(0, 1), floor=-0.1)
    with pytest.raises(FitError, match="floor=nan is not finite"):
        fit_score_law(x, y, floor=float("nan"))
    with pytest.raises(FitError, match="every score is at or below the held floor 0.95"):
        fit_score_law(x, y, floor=0.95)
    with pytest.raises(FitError, match="every score is at or above the held ceiling 0.05"):
        fit_score_law(x, y, ceiling=0.05)
    # 2 scores above the floor for 3 free parameters
    with pytest.raises(FitError, match="2 score.s. lie strictly above the held floor 0.3, "
                                       "fewer than the 3 free parameters"):
        fit_score_law(x, [0.9, 0.7, 0.3, 0.3, 0.3], floor=0.3)
    with pytest.raises(FitError, match="1 score.s. lie strictly between"):
        fit_score_law(x, [1.0, 1.0, 0.5, 0.0, 0.0], floor=0.0, ceiling=1.0)
    # fewer points than free parameters: 2 points fit (γ, l) with both held, not 1 more
    fit = fit_score_law([1.0, 2.0], [0.8, 0.3], floor=0.0, ceiling=1.0)
    assert fit.predict(1.0) == pytest.approx(0.8) and fit.predict(2.0) == pytest.approx(0.3)
    with pytest.raises(FitError, match="2 points for a law of 3 parameters"):
        fit_score_law([1.0, 2.0], [0.8, 0.3], floor=0.0)


def test_round_trip_score_to_params_to_score():
    n, d, loss, score, _ = _family(3)
    loss_law = fit_loss_law(n, d, loss)
    score_law = fit_score_law(loss, score)
    tokens = 3e10
    lo, hi = score_law.reachable
    for s in np.linspace(lo + 0.02 * (hi - lo), hi - 0.3 * (hi - lo), 7):
        n_hat = effective_params(s, loss_law, score_law, tokens)
        assert 0 < n_hat < math.inf
        back = score_law.predict(loss_law.predict(n_hat, tokens))
        assert abs(back - s) < 1e-6
        est = density(s, 1e7, loss_law, score_law, tokens, samples=200)
        assert est.density == pytest.approx(n_hat / 1e7, rel=1e-12)


def test_density_interval_covers_the_truth():
    """The bootstrap interval of a reference-family model's density (truth: 1) covers 1 in about
    95% of synthetic families (40 families; 1% loss noise, 0.01 score noise, the model's score
    measured with the same noise and its standard error passed)."""
    n_model, tokens = 3e7, 1e10
    true_score = _score(_loss(n_model, tokens, **LOSS_TRUTH), **SCORE_TRUTH)
    hits, repeats = 0, 40
    for r in range(repeats):
        n, d, loss, score, rng = _family(100 + r)
        est = density(true_score + 0.01 * rng.standard_normal(), n_model,
                      fit_loss_law(n, d, loss), fit_score_law(loss, score), tokens,
                      score_stderr=0.01, samples=1000, seed=r)
        lo, hi = est.density_interval
        assert lo < est.density < hi
        hits += lo <= 1.0 <= hi
    assert hits >= 0.85 * repeats  # binomial(40, 0.95) falls below 34 with probability < 2%


def test_loss_density_inverts_the_loss_law_and_covers_the_truth():
    """Step 1 alone: ``loss_density`` gives the size whose predicted loss is the model's loss
    (round trip to 1e-9), and its interval covers density 1 for a model of the reference
    family in about 95% of synthetic families."""
    from cpmjax.scaling import loss_density

    n_model, tokens = 3e7, 1e10
    true_loss = _loss(n_model, tokens, **LOSS_TRUTH)
    n, d, loss, _, _ = _family(5)
    law = fit_loss_law(n, d, loss)
    est = loss_density(true_loss, n_model, law, tokens, samples=200)
    assert est.score is None
    assert law.predict(est.effective_params, tokens) == pytest.approx(true_loss, rel=1e-9)
    assert est.density == pytest.approx(est.effective_params / n_model, rel=1e-12)
    below = loss_density(law.floor(tokens) * 0.99, n_model, law, tokens, samples=50)
    assert math.isinf(below.effective_params)  # at or below the floor: unbounded, not NaN
    hits, repeats = 0, 40
    for r in range(repeats):
        n, d, loss, _, rng = _family(300 + r)
        measured = true_loss * (1 + 0.01 * rng.standard_normal())
        est = loss_density(measured, n_model, fit_loss_law(n, d, loss), tokens,
                           loss_stderr=0.01 * true_loss, samples=1000, seed=r)
        lo, hi = est.density_interval
        assert lo <= est.density <= hi
        hits += lo <= 1.0 <= hi
    assert hits >= 0.85 * repeats
    with pytest.raises(FitError, match="loss"):
        loss_density(float("nan"), n_model, law, tokens)
    with pytest.raises(FitError, match="n_params"):
        loss_density(true_loss, 0, law, tokens)


def test_out_of_range_is_typed_or_a_bound_never_nan():
    n, d = _grid()
    loss_law = fit_loss_law(n, d, _loss(n, d, **LOSS_TRUTH))
    x = np.linspace(0.8, 3.5, 30)
    score_law = fit_score_law(x, _score(x, **SCORE_TRUTH))
    lo, hi = score_law.reachable
    for bad in (0.01, lo, hi, hi + 1e-9, 1.5):
        with pytest.raises(OutOfRangeError, match="reachable range"):
            effective_params(bad, loss_law, score_law, 1e10)
    assert effective_params(0.01, loss_law, score_law, 1e10, bound=True) == 0.0
    assert effective_params(1.5, loss_law, score_law, 1e10, bound=True) == math.inf
    # a reachable score whose loss is below the floor b·D^-β at a small budget
    floor = loss_law.floor(1e6)
    s = score_law.predict(floor * 0.99)
    with pytest.raises(OutOfRangeError, match="floor"):
        effective_params(s, loss_law, score_law, 1e6)
    assert effective_params(s, loss_law, score_law, 1e6, bound=True) == math.inf
    est = density(1.5, 1e7, loss_law, score_law, 1e10, bound=True, samples=100)
    assert est.effective_params == math.inf and est.to_dict()["density"] is None
    with pytest.raises(OutOfRangeError):
        density(1.5, 1e7, loss_law, score_law, 1e10)
    with pytest.raises(OutOfRangeError):
        effective_params(float("nan"), loss_law, score_law, 1e10)


# --- the trend ------------------------------------------------------------------------------


def test_density_trend_recovers_slope_and_doubling():
    rng = np.random.default_rng(4)
    start = dt.date(2023, 1, 1)
    days = np.sort(rng.choice(np.arange(0, 700), 29, replace=False))
    dates = [start + dt.timedelta(days=int(t)) for t in days]
    a_true, b_true = 0.0073, -1.2
    rho = np.exp(a_true * days + b_true + 0.05 * rng.standard_normal(days.shape))
    trend = fit_density_trend(dates, rho)
    assert isinstance(trend, DensityTrend)
    assert trend.A == pytest.approx(a_true, rel=0.05)
    assert trend.doubling_days == pytest.approx(math.log(2) / trend.A, rel=1e-12)
    assert trend.doubling_interval[0] < math.log(2) / a_true < trend.doubling_interval[1]
    assert trend.r2 > 0.9
    assert trend.origin == dates[0].isoformat()
    assert trend.predict(dates[0])[0] == pytest.approx(math.exp(trend.B))
    # exact data: the paper's A = 0.0073 per day doubles every 95 days
    exact = fit_density_trend([d.isoformat() for d in dates], np.exp(0.0073 * days))
    assert exact.A == pytest.approx(0.0073, rel=1e-9)
    assert round(exact.doubling_days) == 95
    # numbers of days work as dates
    assert fit_density_trend(days, rho).A == pytest.approx(trend.A, rel=1e-12)


def test_density_trend_breakpoint():
    days = np.arange(0, 600, 20.0)
    cut = 300.0
    log_rho = np.where(days < cut, 0.003 * days, 0.003 * cut + 0.009 * (days - cut))
    trend = fit_density_trend(days, np.exp(log_rho), breakpoint=cut)
    assert trend.pre.A == pytest.approx(0.003, rel=1e-9)
    assert trend.post.A == pytest.approx(0.009, rel=1e-9)
    assert trend.speedup == pytest.approx(3.0, rel=1e-9)
    rng = np.random.default_rng(5)
    noisy = fit_density_trend(days, np.exp(log_rho + 0.05 * rng.standard_normal(days.shape)),
                              breakpoint=cut)
    assert noisy.slope_difference_p < 1e-3  # the slopes differ
    same = fit_density_trend(days, np.exp(0.004 * days + 0.05 * rng.standard_normal(
        days.shape)), breakpoint=cut)
    assert same.slope_difference_p > 0.01
    d = same.to_dict()
    assert d["pre"]["A"] == same.pre.A and json.dumps(d)


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_raises_typed_errors():
    n, d = _grid()
    loss = _loss(n, d, **LOSS_TRUTH)
    with pytest.raises(FitError, match="3 points for a law of 4 parameters"):
        fit_loss_law(n[:3], d[:3], loss[:3])
    with pytest.raises(FitError, match=r"n_params\[2\] = 0.0 is not positive"):
        fit_loss_law(np.where(np.arange(len(n)) == 2, 0, n), d, loss)
    with pytest.raises(FitError, match=r"n_tokens\[0\] = -1.0"):
        fit_loss_law(n, np.where(np.arange(len(n)) == 0, -1, d), loss)
    with pytest.raises(FitError, match=r"loss\[1\] = nan is not finite"):
        fit_loss_law(n, d, np.where(np.arange(len(n)) == 1, np.nan, loss))
    with pytest.raises(FitError, match="differ in length"):
        fit_loss_law(n, d[:-1], loss)
    with pytest.raises(FitError, match="2 token budgets"):
        fit_loss_law(n, np.full_like(n, 1e9), loss)
    with pytest.raises(FitError, match="3 points"):
        fit_score_law([1.0, 2.0, 3.0], [0.1, 0.5, 0.9])
    with pytest.raises(FitError, match="score has one distinct value"):
        fit_score_law([1.0, 2.0, 3.0, 4.0], [0.5] * 4)
    with pytest.raises(FitError, match=r"densities\[1\] = 0.0 is not positive"):
        fit_density_trend(["2024-01-01", "2024-02-01", "2024-03-01"], [1.0, 0.0, 2.0])
    with pytest.raises(FitError, match=r"dates\[2\] = '2024-01-15' comes before dates\[1\]"):
        fit_density_trend(["2024-01-01", "2024-02-01", "2024-01-15"], [1.0, 1.5, 2.0])
    with pytest.raises(FitError, match=r"dates\[1\] = '2024-01-01' repeats dates\[0\]"):
        fit_density_trend(["2024-01-01", "2024-01-01", "2024-03-01"], [1.0, 1.5, 2.0])
    with pytest.raises(FitError, match=r"dates\[0\] = 'yesterday' is not an ISO date"):
        fit_density_trend(["yesterday", "2024-01-01"], [1.0, 2.0])
    with pytest.raises(FitError, match="1 points for a law of 2 parameters"):
        fit_density_trend(["2024-01-01"], [1.0])
    with pytest.raises(FitError, match="each side needs at least 2"):
        fit_density_trend([0, 10, 20, 30], [1, 2, 3, 4], breakpoint=25)
    law = fit_loss_law(n, d, loss)
    x = np.linspace(0.8, 3.5, 30)
    score_law = fit_score_law(x, _score(x, **SCORE_TRUTH))
    with pytest.raises(FitError, match=r"n_params\[0\] = -5.0"):
        density(0.5, -5, law, score_law, 1e10)
    with pytest.raises(FitError, match=r"n_tokens\[0\] = 0.0"):
        effective_params(0.5, law, score_law, 0)
    assert isinstance(law, LossLaw) and isinstance(score_law, ScoreLaw)


def test_exactly_determined_fit_has_no_interval():
    """As many points as parameters: the fit passes through them, its standard errors are
    infinite and density gives no interval (rather than a made-up one)."""
    n = np.array([1e6, 1e7, 1e8, 1e6])
    d = np.array([1e9, 1e9, 1e10, 1e11])
    law = fit_loss_law(n, d, _loss(n, d, **LOSS_TRUTH))
    assert all(math.isinf(v) for v in law.stderr.values())
    x = np.linspace(0.8, 3.5, 30)
    est = density(0.5, 1e7, law, fit_score_law(x, _score(x, **SCORE_TRUTH)), 1e10)
    assert est.density_interval is None and math.isfinite(est.density)


# --- conditional loss -----------------------------------------------------------------------


def _forward(model, rows, *, hidden=False):
    """Full logits (or final hidden states) ``[rows, width, .]`` in float64 of right-padded
    token rows, in one jitted forward (causal attention keeps padding out of the real
    positions; eager dispatch on CPU costs seconds per new shape)."""
    import jax
    from flax import nnx

    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, return_hidden=hidden))(state, ids)
    return np.asarray(out, np.float64)


def _direct_conditional_loss(model, pairs):
    """Reference: full logits of every example, log-softmax in float64, answer positions
    summed."""
    rows = [list(p) + list(a) for p, a in pairs]
    logits = _forward(model, [r[:-1] for r in rows])
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    total, count = 0.0, 0
    for i, (prompt, _) in enumerate(pairs):
        for pos in range(len(prompt) - 1, len(rows[i]) - 1):
            total -= logp[i, pos, rows[i][pos + 1]]
            count += 1
    return total / count


def _random_pairs(rng, n, vocab, max_prompt=9, max_answer=6):
    return [([int(t) for t in rng.integers(3, vocab, rng.integers(1, max_prompt))],
             [int(t) for t in rng.integers(3, vocab, rng.integers(1, max_answer))])
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama checkpoint: (the transformers model in float64, the cpmjax model)."""
    from helpers import save_hf_model, tiny_llama_config
    from transformers import LlamaForCausalLM

    import cpmjax

    path = tmp_path_factory.mktemp("llama")
    torch_model = save_hf_model(LlamaForCausalLM, tiny_llama_config(), path).double()
    return torch_model, cpmjax.from_pretrained(path)


class _Example:
    def __init__(self, prompt, answer):
        self.prompt, self.answer = prompt, answer


def test_conditional_loss_matches_direct_log_softmax(tiny_llama):
    from cpmjax.scaling import conditional_loss

    model = tiny_llama[1]
    rng = np.random.default_rng(6)
    pairs = _random_pairs(rng, 11, model.config.vocab_size)
    want = _direct_conditional_loss(model, pairs)
    # batches of 4 (the last one padded), chunks of 3 positions; pairs and objects mixed
    mixed = [_Example(p, a) if i % 2 else (p, a) for i, (p, a) in enumerate(pairs)]
    got = conditional_loss(model, None, mixed, batch_size=4, chunk=3, bucket=16)
    assert got == pytest.approx(want, rel=2e-5)


def test_conditional_loss_matches_transformers(tiny_llama):
    """The same checkpoint in HF transformers (torch, float64), one unpadded row at a time."""
    import torch

    from cpmjax.scaling import conditional_loss

    torch_model, model = tiny_llama
    pairs = _random_pairs(np.random.default_rng(7), 6, 96)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(torch_model(ids).logits[0], -1)
            for pos in range(len(prompt) - 1, len(prompt) + len(answer) - 1):
                total -= float(logp[pos, ids[0, pos + 1]])
                count += 1
    got = conditional_loss(model, None, pairs, batch_size=4, chunk=3, bucket=16)
    assert got == pytest.approx(total / count, rel=1e-4)


def test_conditional_loss_text_and_errors(tiny_llama, tmp_path):
    from helpers import word_tokenizer

    from cpmjax.errors import PromptTooLongError, TokenIdError
    from cpmjax.scaling import conditional_loss

    model = tiny_llama[1]
    tok = word_tokenizer(tmp_path / "tok")
    text = [("def fibonacci ( n ) :", "return n"), ("if a", "else b c")]
    ids = [(tok(p, add_special_tokens=True)["input_ids"],
            tok(a, add_special_tokens=False)["input_ids"]) for p, a in text]
    got = conditional_loss(model, tok, text, batch_size=4, chunk=3, bucket=16)
    assert got == pytest.approx(_direct_conditional_loss(model, ids), rel=2e-5)
    with pytest.raises(InputError, match="no tokenizer"):
        conditional_loss(model, None, text)
    with pytest.raises(InputError, match=r"examples\[1\] is neither"):
        conditional_loss(model, None, [([1, 2], [3]), 7])
    with pytest.raises(EmptyPromptError, match=r"examples\[0\].prompt has no tokens"):
        conditional_loss(model, None, [([], [3])])
    with pytest.raises(InputError, match=r"examples\[0\].answer has no tokens"):
        conditional_loss(model, None, [([1], [])])
    with pytest.raises(TokenIdError, match=r"examples\[0\] has token id 96"):
        conditional_loss(model, None, [([1], [96])])
    with pytest.raises(PromptTooLongError, match=r"examples\[0\]"):
        conditional_loss(model, None, [([1] * 70, [3])])
    with pytest.raises(InputError, match="examples is empty"):
        conditional_loss(model, None, [])


@pytest.fixture(scope="module")
def bpe_and_model(tmp_path_factory):
    """A byte-level BPE trained on a few repeated phrases ("hello" and " world" are single
    tokens, "wor" and "ld" too) and a tiny random MiniCPM over its vocabulary."""
    from helpers import write_random_minicpm

    from cpmjax.train import train_bpe

    root = tmp_path_factory.mktemp("bpe")
    (root / "text.txt").write_text("hello world\n" * 50 + "return value\n" * 30)
    tok = train_bpe([str(root / "text.txt")], root / "tok", vocab_size=280)
    model = write_random_minicpm(root / "model", seed=3, vocab_size=len(tok))
    return tok, model


def test_conditional_loss_joint_tokenization(bpe_and_model):
    """``joint=True`` encodes prompt + answer as one text: where BPE merges across the
    boundary ("hello wor" + "ld" -> "hello", " world") the straddling token is an answer token.
    References: the token splits written out by hand, scored by a full-logits log-softmax."""
    from tokenizers import processors

    from cpmjax.scaling import conditional_loss

    tok, model = bpe_and_model

    def ids(*tokens):
        out = tok.convert_tokens_to_ids(list(tokens))
        assert tok.unk_token_id not in out
        return out

    text = [("hello wor", "ld"), ("hello ", "world"), ("hello", " world"),
            ("return", " value")]
    joint = [(ids("<s>", "hello"), ids("Ġworld")), (ids("<s>", "hello"), ids("Ġworld")),
             (ids("<s>", "hello"), ids("Ġworld")),
             (ids("<s>", "return"), ids("Ġvalue"))]
    apart = [(ids("<s>", "hello", "Ġwor"), ids("ld")), (ids("<s>", "hello", "Ġ"),
                                                       ids("wor", "ld")),
             (ids("<s>", "hello"), ids("Ġworld")),
             (ids("<s>", "return"), ids("Ġvalue"))]
    got_joint = conditional_loss(model, tok, text, batch_size=4, chunk=3, bucket=8, joint=True)
    got_apart = conditional_loss(model, tok, text, batch_size=4, chunk=3, bucket=8)
    assert got_joint == pytest.approx(_direct_conditional_loss(model, joint), rel=2e-5)
    assert got_apart == pytest.approx(_direct_conditional_loss(model, apart), rel=2e-5)
    assert abs(got_joint - got_apart) > 1e-3
    # the clean boundary alone: both tokenizations agree
    clean = text[2:]
    assert conditional_loss(model, tok, clean, joint=True) == pytest.approx(
        conditional_loss(model, tok, clean), rel=1e-6)
    # an EOS the tokenizer appends after the text is not an answer token
    eos_tok = copy.deepcopy(tok)
    eos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id),
                                               ("</s>", tok.eos_token_id)])
    assert eos_tok("hello")["input_ids"][-1] == tok.eos_token_id
    assert conditional_loss(model, eos_tok, text, joint=True) == pytest.approx(
        got_joint, rel=1e-6)
    # typed errors: token ids, a tokenizer without offsets, a prompt merged into the answer
    with pytest.raises(InputError, match=r"examples\[0\]: joint tokenization encodes text"):
        conditional_loss(model, tok, [([1, 5], [7])], joint=True)

    class NoOffsets:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, 5, 7]}

    with pytest.raises(InputError, match="joint tokenization needs the tokenizer's character "
                                         "offsets"):
        conditional_loss(model, NoOffsets(), text, joint=True)
    bare = copy.deepcopy(tok)  # no BOS: "hel" + "lo world" -> "hello", " world", all answer
    bare.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    with pytest.raises(EmptyPromptError, match=r"examples\[0\].prompt has no tokens"):
        conditional_loss(model, bare, [("hel", "lo world")], joint=True)


def test_nonzero_params_of_pruned_and_quantized_models(tiny_llama):
    """Nonzero non-embedding weights: a float model with known zeros, a pruned one (its zeros
    from the masks) and an int8-quantized one (its logical weights: nonzero exactly where the
    integer is, per-channel scales being positive)."""
    from flax import nnx

    from cpmjax.compress import QuantizedLinear, masks, prune, quantize
    from cpmjax.compress.quantize import NF4_LEVELS
    from cpmjax.scaling.densing import nonzero_params
    from cpmjax.scaling.family import non_embedding_params

    model = nnx.clone(tiny_llama[1])
    full = non_embedding_params(model)
    assert nonzero_params(model) == full  # random weights: no exact zeros
    layer = model.model.layers[0]
    kernel = np.asarray(layer.self_attn.q_proj.kernel[...]).copy()
    kernel[:3, :5] = 0.0  # 15 known zeros
    layer.self_attn.q_proj.kernel.set_value(kernel)
    model.model.embed_tokens.embedding.set_value(model.model.embed_tokens.embedding[...] * 0)
    assert nonzero_params(model) == full - 15  # the embedding's zeros do not count
    pruned = nnx.clone(tiny_llama[1])
    prune(pruned, 0.5)
    zeros = sum(int(np.sum(~np.asarray(mask))) for mask in masks(pruned).values())
    assert zeros > 0 and nonzero_params(pruned) == full - zeros
    quantize(pruned, bits=8)
    quantized = [m for _, m in nnx.iter_graph(pruned) if isinstance(m, QuantizedLinear)]
    assert quantized
    other = sum(int(np.count_nonzero(np.asarray(v[...])))
                for path, v in nnx.to_flat_state(nnx.state(pruned, nnx.Param))
                if "embed_tokens" not in map(str, path) and "lm_head" not in map(str, path))
    want = other + sum(int(np.count_nonzero(np.asarray(m.kernel[...]))) for m in quantized)
    assert nonzero_params(pruned) == want
    assert full - zeros - 0.05 * full <= want <= full - zeros  # few weights round to 0
    # NF4 stores level indices (0 is not the zero level): its logical weights are counted
    nf4 = nnx.clone(tiny_llama[1])
    prune(nf4, 0.5)
    quantize(nf4, bits="nf4")
    levels = np.asarray(NF4_LEVELS)
    quantized = [m for _, m in nnx.iter_graph(nf4) if isinstance(m, QuantizedLinear)]
    nonzero_levels = sum(int(np.count_nonzero(levels[np.asarray(m.kernel[...], np.int32)]))
                         for m in quantized)
    assert nonzero_params(nf4) == other + nonzero_levels
    with pytest.raises(InputError, match="dict is not a model"):
        nonzero_params({})


# --- the command line -----------------------------------------------------------------------


def test_cli_density_trend(tmp_path, capsys):
    from cpmjax.cli import main

    rng = np.random.default_rng(8)
    start = dt.date(2022, 6, 1)
    days = np.sort(rng.choice(np.arange(0, 800), 20, replace=False))
    rows = [(f"m{i}", (start + dt.timedelta(days=int(t))).isoformat(), 1e9,
             math.exp(0.0073 * t - 2 + 0.03 * rng.standard_normal()))
            for i, t in enumerate(days)]
    table = tmp_path / "models.csv"
    # rows out of date order: the command sorts the table
    table.write_text("name,date,params,density\n" + "".join(
        f"{n},{d},{p:g},{r:.6g}\n" for n, d, p, r in reversed(rows)))
    out, figure = tmp_path / "trend.json", tmp_path / "trend.png"
    assert main(["scaling", "density-trend", "--csv", str(table), "--breakpoint",
                 (start + dt.timedelta(days=400)).isoformat(), "--figure", str(figure),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "doubling every" in printed and "speed-up" in printed
    result = json.loads(out.read_text())
    assert result["trend"]["A"] == pytest.approx(0.0073, rel=0.05)
    assert result["trend"]["doubling_days"] == pytest.approx(
        math.log(2) / result["trend"]["A"], rel=1e-12)
    assert result["trend"]["pre"]["n_points"] + result["trend"]["post"]["n_points"] == 20
    assert figure.stat().st_size > 10_000
    # two models on one date, a missing column: typed errors, exit code 2
    table.write_text("name,date,params,density\na,2024-01-01,1,1\nb,2024-01-01,1,2\n")
    assert main(["scaling", "density-trend", "--csv", str(table)]) == 2
    assert "b (line 3) and a (line 2) share the date 2024-01-01" in capsys.readouterr().err
    table.write_text("name,date,params,density\na,2024-01-01,1,1\nb,2024-01-01,1,2\n"
                     "c,2024-03-01,1,3\n")
    assert main(["scaling", "density-trend", "--csv", str(table), "--densest-per-date",
                 "--out", str(out)]) == 0
    assert [m["name"] for m in json.loads(out.read_text())["models"]] == ["b", "c"]
    table.write_text("name,date,density\na,2024-01-01,1\n")
    assert main(["scaling", "density-trend", "--csv", str(table)]) == 2
    assert "missing column(s) params" in capsys.readouterr().err


# a known loss law for the fabricated family (its N are the tiny models' real sizes) and a
# known sigmoid for its scores
CLI_SCORE = dict(c=0.8, gamma=-2.0, l=6.5, d=0.1)
WORDS = "def fibonacci ( n ) : return if else a b c the of and to"


def _hidden_and_targets(model, tokenizer, instances):
    """Final hidden states and target ids at the answer positions of every instance."""
    prompts = [tokenizer(x.prompt, add_special_tokens=True)["input_ids"] for x in instances]
    rows = [p + tokenizer(x.answer, add_special_tokens=False)["input_ids"]
            for p, x in zip(prompts, instances, strict=True)]
    states = _forward(model, [r[:-1] for r in rows], hidden=True)
    hidden = [states[i, len(p) - 1:len(r) - 1]
              for i, (p, r) in enumerate(zip(prompts, rows, strict=True))]
    targets = [t for p, r in zip(prompts, rows, strict=True) for t in r[len(p):]]
    return np.concatenate(hidden), np.asarray(targets)


def _fabricate_family(root, instances, tokenizer_dir):
    """Two tiny MiniCPM sizes x three token budgets; each member is the size's random model
    with its LM head scaled so that its conditional loss on ``instances`` is exactly the known
    law's loss at (its real non-embedding size, its budget). Writes RUNS/family.json."""
    from flax import nnx
    from helpers import word_tokenizer, write_random_minicpm
    from scipy.optimize import brentq
    from scipy.special import logsumexp

    import cpmjax
    from cpmjax.scaling.family import non_embedding_params

    tok = cpmjax.load_tokenizer(tokenizer_dir)
    budgets = [1e6, 1e7, 1e8]
    sizes = [(16, 2), (48, 3)]  # (hidden, layers)
    models = []
    for hidden, layers in sizes:
        model = write_random_minicpm(root / f"init{hidden}", seed=hidden, hidden_size=hidden,
                                     num_hidden_layers=layers, intermediate_size=2 * hidden,
                                     tie_word_embeddings=False)
        models.append((model, non_embedding_params(model)))
    n_small = min(n for _, n in models)
    law = dict(a=1.0 * n_small ** 0.5, alpha=0.5, b=30.0, beta=0.1)
    runs = {}
    for (model, n), (hidden, layers) in zip(models, sizes, strict=True):
        h, t = _hidden_and_targets(model, tok, instances)
        w0 = np.asarray(model.lm_head.kernel[...], np.float64)  # [hidden, vocab]
        branches = {}
        for step, budget in enumerate(budgets):
            target = _loss(n, budget, **law)

            def loss_at(scale, h=h, t=t, w0=w0, target=target):
                logits = scale * h @ w0
                return float(np.mean(logsumexp(logits, -1) - logits[np.arange(len(t)), t])
                             - target)

            scale = brentq(loss_at, 0.0, 1e4, xtol=1e-12)
            member = nnx.clone(model)
            member.lm_head.kernel.set_value(np.asarray(scale * w0, np.float32))
            export = root / f"s{hidden}" / f"branch{step}" / "hf"
            cpmjax.save_pretrained(member, export)
            word_tokenizer(export, WORDS)
            branches[str(step)] = {"start_step": step, "steps": step + 1, "tokens": int(budget),
                                   "eval_loss": target, "wall_s": 0.0,
                                   "export_dir": str(export), "done": True}
        runs[f"s{hidden}"] = {"non_embedding_params": n, "total_params": n, "layers": layers,
                              "width": hidden, "branches": branches, "stable": {"wall_s": 0.0}}
    (root / "family.json").write_text(json.dumps({"runs": runs, "lr_sweep": {}}))
    return law, models


def test_cli_density_on_a_fabricated_family(tmp_path, monkeypatch, capsys):
    """The whole ``cpmjax scaling density`` path on a family whose losses follow a known law
    exactly: the law comes back, and a member measured as a model has density 1. The random
    models' greedy accuracy is 0 everywhere, so the scorer is replaced by the known sigmoid of
    the model's (real) conditional loss."""
    from helpers import word_tokenizer

    import cpmjax
    from cpmjax.cli import main
    from cpmjax.scaling import conditional_loss, passuntil
    from cpmjax.scaling.densing import nonzero_params
    from cpmjax.scaling.tasks import Instance

    word_tokenizer(tmp_path / "tok", WORDS)
    instances = [Instance(id=str(i), prompt=p, answer=a) for i, (p, a) in enumerate([
        ("def fibonacci ( n ) :", "return n"), ("if a", "else b"), ("the of", "and to"),
        ("a b c", "the"), ("def a ( b ) :", "return a b"), ("if n :", "return c"),
        ("c b a", "of"), ("and to the", "of a")])]
    instance_file = tmp_path / "instances.jsonl"
    instance_file.write_text("".join(json.dumps(dataclasses_asdict(x)) + "\n"
                                     for x in instances))
    runs = tmp_path / "runs"
    runs.mkdir()
    law, models = _fabricate_family(runs, instances, tmp_path / "tok")

    def scorer(model, tokenizer, instances, check, batch_size=16, **_):
        loss = conditional_loss(model, tokenizer, instances, batch_size=batch_size)
        return float(_score(loss, **CLI_SCORE))

    monkeypatch.setattr(passuntil, "greedy_accuracy", scorer)
    member = runs / "s16" / "branch2" / "hf"
    out, figures, cache = tmp_path / "density.json", tmp_path / "fig", tmp_path / "cache.json"
    argv = ["scaling", "density", "--family", str(runs), "--model", str(member),
            "--name", "member", "--task", "arithmetic", "--instances", str(instance_file),
            "--out", str(out), "--figures", str(figures), "--cache", str(cache),
            "--samples", "500", "--batch-size", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "member: N = " in printed and "ρ = " in printed
    result = json.loads(out.read_text())
    for name, value in law.items():
        assert result["loss_law"][name] == pytest.approx(value, rel=1e-3), name
    for name, value in CLI_SCORE.items():
        assert result["score_law"][name] == pytest.approx(value, rel=1e-3), name
    (model,) = result["models"]
    assert model["n_params"] == models[0][1] and result["n_tokens"] == 1e8
    assert model["density"] == pytest.approx(1.0, rel=1e-3)
    assert model["loss_effective_params"] == pytest.approx(models[0][1], rel=1e-3)
    assert model["loss_density"] == pytest.approx(1.0, rel=1e-3)
    lo, hi = model["density_interval"]  # 8 instances: a wide score error, maybe unbounded
    assert lo < 1.0 and (hi is None or hi > 1.0)
    for name in ("loss_law.png", "score_law.png", "density.png"):
        assert (figures / name).stat().st_size > 10_000
    assert result["holdout_largest"] is None  # two sizes: one left cannot fit the law
    assert result["warnings"] == []
    # the rerun reads every evaluation from the cache (the scorer is not called again)
    monkeypatch.setattr(passuntil, "greedy_accuracy", None)
    assert main(argv) == 0
    assert json.loads(out.read_text())["models"][0]["density"] == model["density"]
    assert model["n_params_source"] == "counted: non-embedding parameters"
    capsys.readouterr()
    # N given (--params) or counted as nonzero weights (loads the model, scores from the cache)
    assert main(argv + ["--params", "5e4"]) == 0
    (given,) = json.loads(out.read_text())["models"]
    assert given["n_params"] == 5e4 and given["n_params_source"] == "given (--params)"
    assert given["density"] == pytest.approx(model["effective_params"] / 5e4, rel=1e-12)
    assert given["non_embedding_params"] == models[0][1]
    assert main(argv + ["--params", "auto", "--count", "nonzero"]) == 0
    (counted,) = json.loads(out.read_text())["models"]
    assert counted["n_params_source"] == "counted: nonzero non-embedding weights"
    assert counted["n_params"] == nonzero_params(cpmjax.from_pretrained(member)) == models[0][1]
    assert "nonzero_params" in next(v for k, v in json.loads(cache.read_text()).items()
                                    if k.startswith(str(member)) and "greedy" in k)
    # the sigmoid's floor and ceiling held at the truth's: the rest of the law is recovered
    assert main(argv + ["--score-floor", "0.1", "--score-ceiling", "0.9"]) == 0
    result = json.loads(out.read_text())
    assert result["score_law"]["held"] == {"floor": 0.1, "ceiling": 0.9}
    assert result["score_law"]["stderr"]["d"] == 0.0
    for name, value in CLI_SCORE.items():
        assert result["score_law"][name] == pytest.approx(value, rel=1e-3), name
    assert result["models"][0]["density"] == pytest.approx(1.0, rel=1e-3)
    assert "floor held at 0.1, ceiling held at 0.9" in capsys.readouterr().out
    # --joint-tokenization: the answers' losses of the joint encoding, cached apart
    assert main(argv + ["--joint-tokenization"]) == 0
    result = json.loads(out.read_text())
    assert result["joint_tokenization"] is True
    tok = cpmjax.load_tokenizer(member)
    assert result["models"][0]["conditional_loss"] == pytest.approx(conditional_loss(
        cpmjax.from_pretrained(member), tok, instances, joint=True), rel=1e-5)
    assert any(k.endswith("|conditional_loss|joint") for k in json.loads(cache.read_text()))
    capsys.readouterr()
    # typed errors before any compute
    for extra, message in ((["--params", "1", "--params", "2"], "2 --params for 1 --model"),
                           (["--params", "-5"], "must be a positive number"),
                           (["--params", "many"], "not a number or 'auto'"),
                           (["--score-floor", "0.5", "--score-ceiling", "0.5"],
                            "--score-floor 0.5 is not below --score-ceiling 0.5"),
                           (["--score-ceiling", "1.5"], "lies outside --score-range 0 1")):
        assert main(argv + extra) == 2, extra
        assert message in capsys.readouterr().err
    # --score passuntil: the mean of per-instance estimates, its standard error over instances
    offsets = np.tile([0.01, -0.01], 4)

    def pass_until(model, tokenizer, instances, *, check, **_):
        mean = scorer(model, tokenizer, instances, check, batch_size=8)
        return types.SimpleNamespace(estimate=mean + offsets, mean_estimate=mean)

    monkeypatch.setattr(passuntil, "pass_until", pass_until)
    assert main(argv + ["--score", "passuntil", "--loss", "eval"]) == 0
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert result["score"] == "passuntil" and "conditional_loss" not in model
    assert model["score_stderr"] == pytest.approx(0.01 * math.sqrt(8 / 7) / math.sqrt(8))
    assert model["density"] == pytest.approx(1.0, rel=1e-3)
    lo, hi = model["density_interval"]
    assert lo < 1.0 < hi < 2.0
    # the cache keeps scores and losses apart: passuntil scores with task losses need nothing
    monkeypatch.setattr(passuntil, "pass_until", None)
    assert main(argv + ["--score", "passuntil"]) == 0
    assert json.loads(out.read_text())["models"][0]["conditional_loss"] == pytest.approx(
        _loss(models[0][1], 1e8, **law), rel=1e-5)
    capsys.readouterr()
    # typed errors before any compute
    assert main(["scaling", "density", "--family", str(runs), "--model", str(member),
                 "--task", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    assert main(["scaling", "density", "--family", str(tmp_path / "none"), "--model",
                 str(member), "--task", "arithmetic"]) == 2
    assert "no family index" in capsys.readouterr().err
    assert main(["scaling", "density", "--family", str(runs), "--model", str(tmp_path / "x"),
                 "--task", "arithmetic"]) == 2
    assert "--model directory does not exist" in capsys.readouterr().err


def dataclasses_asdict(x):
    import dataclasses

    return dataclasses.asdict(x)


def test_holdout_of_the_largest_size():
    """The loss law fitted without the largest size, and its relative error there."""
    from cpmjax.scaling.cli_density import _holdout_largest

    n, d = _grid(5, 3)
    points = [{"n_params": a, "tokens": b, "loss": _loss(a, b, **LOSS_TRUTH)}
              for a, b in zip(n, d, strict=True)]
    exact = _holdout_largest(points)
    assert exact["n_params"] == n.max() and exact["points"] == 3
    assert exact["max_relative_error"] < 1e-8
    bent = [dict(p, loss=p["loss"] * (1.03 if p["n_params"] == n.max() else 1.0))
            for p in points]
    assert _holdout_largest(bent)["max_relative_error"] == pytest.approx(0.03 / 1.03, rel=1e-6)
    assert _holdout_largest(points[:6]) is None  # two sizes: one left


def test_default_model_names():
    from cpmjax.scaling.cli_density import _default_name

    assert _default_name("/r/wind-tunnel/wt-s2/decay-400/hf") == "wt-s2/decay-400"
    assert _default_name("/models/my-model/") == "my-model"


def test_fit_warnings():
    from cpmjax.scaling.cli_density import _fit_warnings

    n, d, loss, score, _ = _family(9)
    loss_law, score_law = fit_loss_law(n, d, loss), fit_score_law(loss, score)
    assert _fit_warnings(loss_law, score_law) == []
    flat = fit_score_law(loss, 0.3 + 0.05 * np.random.default_rng(0).standard_normal(len(loss)))
    assert any("score law fits poorly" in w for w in _fit_warnings(loss_law, flat))
    rising = fit_score_law(loss, _score(loss, **dict(SCORE_TRUTH, gamma=3.0)))
    assert any("rises with the loss" in w for w in _fit_warnings(loss_law, rising))


def test_text_chunks_cut_whole_lines_within_the_byte_budget():
    from cpmjax.scaling import text_chunks

    text = "def a():\n    return 1\n\n" + "x = 'é' * 3  # ü\n" * 7 + "y" * 50 + "\nz\n"
    pieces = text_chunks(text, 24)
    assert "".join(pieces) == text  # no blank piece was dropped here
    assert all(0 < len(p.encode("utf-8")) <= 24 for p in pieces)
    assert pieces[0] == "def a():\n    return 1\n\n"  # whole lines while they fit
    assert text_chunks("\n\n  \n", 8) == []
    with pytest.raises(InputError, match="max_bytes"):
        text_chunks(text, 0)


def test_text_loss_per_byte_matches_direct_log_softmax(tiny_llama, tmp_path):
    from helpers import word_tokenizer
    from tokenizers import processors

    from cpmjax.scaling import text_chunks, text_loss_per_byte

    model = tiny_llama[1]
    tok = word_tokenizer(tmp_path / "tok")
    with pytest.raises(EmptyPromptError):  # no BOS: the first token has nothing to follow
        text_loss_per_byte(model, tok, ["def a"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    texts = ["def fibonacci ( n ) :\n  return n\nif a\n", "the b of c and\nelse a to the\n"]
    nats, n_bytes, n_tokens = text_loss_per_byte(model, tok, texts, max_bytes=16,
                                                 batch_size=3, chunk=2)
    pieces = [p for t in texts for p in text_chunks(t, 16)]  # each scored as its own document
    assert len(pieces) > len(texts)
    assert n_bytes == sum(len(t.encode()) for t in texts)
    total, count = 0.0, 0
    for piece in pieces:
        answer = tok(piece, add_special_tokens=False)["input_ids"]
        total += _direct_conditional_loss(model, [([1], answer)]) * len(answer)
        count += len(answer)
    assert n_tokens == count
    assert nats == pytest.approx(total / n_bytes, rel=2e-5)
    with pytest.raises(InputError, match="no non-blank"):
        text_loss_per_byte(model, tok, ["\n \n"])
