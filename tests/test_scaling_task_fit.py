"""Task scaling law fits and the accelerated-emergence test on synthetic pass rates with known
parameters: recovery within 2%, standard errors against the closed-form OLS formulas, the
instance-level prediction, the curvature test's false-positive rate and power, typed errors,
and the figure."""

from __future__ import annotations

import numpy as np
import pytest

from cpmjax.errors import FitError
from cpmjax.scaling import accelerated_emergence, fit_task_scaling

SIZES = np.array([1e6, 3e6, 1e7, 3e7, 1e8, 3e8])


def _law(n, c, alpha):
    return np.exp(-c * np.asarray(n, np.float64) ** -alpha)


@pytest.mark.parametrize("c,alpha", [(50.0, 0.3), (400.0, 0.45), (8.0, 0.12)])
def test_recovers_known_law(c, alpha):
    rng = np.random.default_rng(int(c))

    def noisy(relative):  # multiplicative noise on -log PU
        return np.exp(np.log(_law(SIZES, c, alpha)) * np.exp(relative * rng.standard_normal(6)))

    for _ in range(5):  # 0.1% noise: c and alpha within 2%
        law = fit_task_scaling(SIZES, noisy(0.001))
        assert law.c == pytest.approx(c, rel=0.02)
        assert law.alpha == pytest.approx(alpha, rel=0.02)
        assert law.r2 > 0.99
        assert law.predict(1e9) == pytest.approx(_law(1e9, c, alpha), rel=0.02)
    # 5% noise: the errors agree with the reported standard errors (log c is extrapolated to
    # log N = 0, so its error is ~8x the noise here)
    z_c, z_alpha = [], []
    for _ in range(200):
        law = fit_task_scaling(SIZES, noisy(0.05))
        z_c.append((law.c - c) / law.c_stderr)
        z_alpha.append((law.alpha - alpha) / law.alpha_stderr)
    # t with 4 degrees of freedom: |t| < 2.776 with probability 0.95
    assert 0.88 < np.mean(np.abs(z_alpha) < 2.776) < 0.99
    assert abs(np.median(z_alpha)) < 0.25
    assert 0.8 < np.mean(np.abs(z_c) < 2.776)  # delta method: approximate for large se
    exact = fit_task_scaling(SIZES, _law(SIZES, c, alpha))
    assert exact.c == pytest.approx(c, rel=1e-9) and exact.alpha == pytest.approx(alpha)


def test_standard_errors_match_ols_formulas():
    rng = np.random.default_rng(1)
    rates = np.exp(np.log(_law(SIZES, 30.0, 0.25)) * np.exp(0.05 * rng.standard_normal(6)))
    law = fit_task_scaling(SIZES, rates)
    x, y = np.log(SIZES), np.log(-np.log(rates))
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    sigma2 = np.sum((y - design @ coef) ** 2) / (x.size - 2)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    assert law.alpha == pytest.approx(-coef[1])
    assert law.alpha_stderr == pytest.approx(np.sqrt(cov[1, 1]))
    assert law.c_stderr == pytest.approx(np.exp(coef[0]) * np.sqrt(cov[0, 0]))


def test_instance_level_prediction_is_the_mean_of_instance_laws():
    rng = np.random.default_rng(2)
    c = rng.uniform(5, 200, size=7)
    alpha = rng.uniform(0.1, 0.4, size=7)
    rates = _law(SIZES[:, None], c[None], alpha[None])  # [sizes, instances]
    weights = rng.uniform(0.5, 2.0, size=7)
    law = fit_task_scaling(SIZES, rates, level="instance", instance_weights=weights)
    np.testing.assert_allclose(law.c, c, rtol=1e-8)
    np.testing.assert_allclose(law.alpha, alpha, rtol=1e-8)
    target = np.array([1e9, 1e10])
    expected = _law(target[None], c[:, None], alpha[:, None]).T @ (weights / weights.sum())
    np.testing.assert_allclose(law.predict(target), expected, rtol=1e-8)
    assert law.r2 == pytest.approx(1.0)
    # the dataset-level law on the same mean differs: a mean of laws is not a law
    dataset = fit_task_scaling(SIZES, rates, instance_weights=weights)
    assert dataset.r2 < 1.0
    np.testing.assert_allclose(dataset.pass_rates, rates @ (weights / weights.sum()))


def test_curvature_test_calibration_and_power():
    """Over 300 noise draws: straight F rejects at about the 5% level (binomial bounds), a
    concave F (accelerated emergence) is detected nearly always and flagged as accelerated, a
    convex one as significant but not accelerated."""
    rng = np.random.default_rng(3)
    sizes = np.geomspace(1e6, 1e9, 8)
    x = np.log(sizes) - np.log(sizes).mean()
    draws, noise = 300, 0.05
    outcomes = {"linear": [], "concave": [], "convex": []}
    for _ in range(draws):
        e = noise * rng.standard_normal(x.size)
        for name, q in (("linear", 0.0), ("concave", -0.15), ("convex", 0.15)):
            f = 1.0 - 0.3 * x + q * x * x + e
            outcomes[name].append(accelerated_emergence(sizes, np.exp(-np.exp(f))))
    false_positive = np.mean([o.significant for o in outcomes["linear"]])
    assert abs(false_positive - 0.05) < 3.5 * np.sqrt(0.05 * 0.95 / draws), false_positive
    assert np.mean([o.accelerated for o in outcomes["concave"]]) > 0.95
    assert np.mean([o.significant and not o.accelerated for o in outcomes["convex"]]) > 0.95
    q = np.array([o.curvature for o in outcomes["concave"]])
    stderr = np.array([o.stderr for o in outcomes["concave"]])
    # the reported standard error is the spread of the estimate across draws
    assert q.mean() == pytest.approx(-0.15, abs=4 * q.std() / np.sqrt(draws))
    assert np.median(stderr) == pytest.approx(q.std(), rel=0.2)


def test_exact_curves():
    sizes = np.geomspace(1e6, 1e9, 5)
    straight = accelerated_emergence(sizes, _law(sizes, 40.0, 0.3))
    assert not straight.significant and abs(straight.curvature) < 1e-8
    x = np.log(sizes) - np.log(sizes).mean()
    bent = accelerated_emergence(sizes, np.exp(-np.exp(0.5 - 0.2 * x - 0.1 * x * x)))
    assert bent.accelerated and bent.curvature == pytest.approx(-0.1)


def test_typed_errors():
    rates = _law(SIZES, 50.0, 0.3)
    with pytest.raises(FitError, match="at least 3"):
        fit_task_scaling(SIZES[:2], rates[:2])
    with pytest.raises(FitError, match="at least 4"):
        accelerated_emergence(SIZES[:3], rates[:3])
    with pytest.raises(FitError, match="mismatched"):
        fit_task_scaling(SIZES, rates[:5])
    with pytest.raises(FitError, match="size 2 is"):
        fit_task_scaling(np.array([1e6, 2e6, -1.0, 4e6]), rates[:4])
    zero = rates.copy()
    zero[3] = 0.0
    with pytest.raises(FitError, match="at size 3e\\+07"):
        fit_task_scaling(SIZES, zero)
    per_instance = np.stack([rates, rates], axis=1)
    per_instance[4, 1] = 1.0
    with pytest.raises(FitError, match="size 1e\\+08, instance 1"):
        fit_task_scaling(SIZES, per_instance, level="instance")
    with pytest.raises(FitError, match="level"):
        fit_task_scaling(SIZES, rates, level="token")
    with pytest.raises(FitError, match="instance_weights"):
        fit_task_scaling(SIZES, per_instance, instance_weights=[1.0, 2.0, 3.0])
    with pytest.raises(FitError, match="positive sizes"):
        fit_task_scaling(SIZES, rates).predict(0)


def _write_result(path, size, rates, seed=0):
    from cpmjax.scaling import PassUntilResult, pass_until_estimate

    rates = np.asarray(rates, np.float64)
    passes = (rates > 0).astype(int)
    samples = np.where(passes, np.round(1.0 / np.maximum(rates, 1e-9)), 1000).astype(int)
    estimate, low, high = pass_until_estimate(passes, samples)
    result = PassUntilResult(
        ids=[f"i{k}" for k in range(len(rates))], passes=passes,
        samples=samples, estimate=np.asarray(rates, np.float64), low=low, high=high,
        required_passes=1, max_samples=10**6, confidence=0.95, temperature=1.0, seed=seed,
        metadata={"task": "arithmetic", "non_embedding_params": int(size)})
    result.save(path)


def test_cli_fit(tmp_path, capsys):
    """``cpmjax scaling fit`` on PassUntil results of five sizes whose instance PUs follow
    known laws: the dataset fit, the instance-level prediction, emergence, the figure."""
    import json

    from cpmjax.cli import main

    rng = np.random.default_rng(5)
    c, alpha = rng.uniform(20, 80, size=4), rng.uniform(0.2, 0.3, size=4)
    sizes = np.array([2e6, 5e6, 1.2e7, 3e7, 8e7])
    paths = []
    for k, size in enumerate(sizes[::-1]):  # any order: the command sorts by size
        paths.append(str(tmp_path / f"m{k}.json"))
        _write_result(paths[-1], size, _law(size, c, alpha))
    out, figure = tmp_path / "fit.json", tmp_path / "fit.png"
    assert main(["scaling", "fit", "--results", *paths, "--level", "instance", "--predict",
                 "1e9", "--out", str(out), "--figure", str(figure)]) == 0
    record = json.loads(out.read_text())
    np.testing.assert_allclose(record["fit"]["c"], c, rtol=1e-6)
    np.testing.assert_allclose(record["fit"]["alpha"], alpha, rtol=1e-6)
    assert record["prediction"]["pass_rate"] == pytest.approx(np.mean(_law(1e9, c, alpha)))
    assert record["emergence"] is not None and "curvature" in record["emergence"]
    assert figure.stat().st_size > 10_000
    dataset_out = tmp_path / "dataset.json"
    assert main(["scaling", "fit", "--results", *paths, "--out", str(dataset_out),
                 "--predict", "1e9", "--figure", str(figure)]) == 0
    written = json.loads(dataset_out.read_text())
    dataset = written["fit"]
    low, high = written["prediction"]["interval_95"]
    assert low < written["prediction"]["pass_rate"] < high
    mean = np.array([np.mean(_law(s, c, alpha)) for s in sizes])
    direct = fit_task_scaling(sizes, mean)
    assert dataset["c"] == pytest.approx(direct.c) and dataset["alpha"] == pytest.approx(
        direct.alpha)
    # two sizes only, or a size with PU = 0: exit code 2 with the culprit named
    assert main(["scaling", "fit", "--results", *paths[:2], "--out", str(out)]) == 2
    _write_result(paths[0], sizes[-1], [0.0, 0.1, 0.1, 0.1])
    capsys.readouterr()
    assert main(["scaling", "fit", "--results", *paths, "--level", "instance",
                 "--out", str(out)]) == 2
    assert "size 8e+07, instance 0" in capsys.readouterr().err


def test_prediction_interval():
    """Against the matrix form s^2 (1 + x0' (X'X)^-1 x0), and by coverage: a new noisy
    measurement at a size beyond the fitted range falls inside 95% of the time."""
    from scipy.stats import t as student_t

    rng = np.random.default_rng(7)
    x, x0 = np.log(SIZES), np.log(2e9)
    design = np.stack([np.ones_like(x), x], axis=1)
    noise, draws, inside = 0.1, 2000, 0
    for trial in range(draws):
        f = np.log(30.0) - 0.25 * x + noise * rng.standard_normal(x.size)
        law = fit_task_scaling(SIZES, np.exp(-np.exp(f)))
        low, high = law.prediction_interval(2e9)
        new = np.exp(-np.exp(np.log(30.0) - 0.25 * x0 + noise * rng.standard_normal()))
        inside += bool(low <= new <= high)
        if trial == 0:
            coef, *_ = np.linalg.lstsq(design, f, rcond=None)
            s2 = np.sum((f - design @ coef) ** 2) / (x.size - 2)
            point = np.array([1.0, x0])
            se = np.sqrt(s2 * (1 + point @ np.linalg.inv(design.T @ design) @ point))
            q = student_t.ppf(0.975, x.size - 2)
            expected = np.exp(-np.exp(point @ coef + np.array([q, -q]) * se))
            np.testing.assert_allclose([low, high], expected, rtol=1e-9)
            assert low < law.predict(2e9) < high
    assert abs(inside / draws - 0.95) < 3.5 * np.sqrt(0.95 * 0.05 / draws), inside / draws
    instance = fit_task_scaling(SIZES, np.stack([_law(SIZES, 30.0, 0.25)] * 2, axis=1),
                                level="instance")
    with pytest.raises(FitError, match="dataset-level"):
        instance.prediction_interval(1e9)
