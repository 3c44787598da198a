"""``fit(X, y, sample_weight)``: an integer weight counts a sample that many times, a zero weight drops it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.neighbors import KNeighborsClassifier

from moekit.classic import (
    HierarchicalMixtureOfExperts,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
    select_n_experts,
)
from moekit.classic.wrapped import EstimatorExperts

TIGHT = dict(random_state=0, tol=1e-10, max_iter=400)


def _problem(task: str, regimes: int = 2, n: int = 240, seed: int = 0):
    """Well-separated regimes in x0 and x1 (a clear k-means start, one cluster per expert), each with
    its own line or label rule in x2."""
    rng = np.random.default_rng(seed)
    regime = rng.integers(0, regimes, n)
    X = np.column_stack([6.0 * regime + rng.normal(0, 0.3, n), 6.0 * regime + rng.normal(0, 0.3, n),
                         rng.uniform(-2, 2, n)])
    slope, offset = np.array([2.0, -1.0, 0.5, -3.0])[regime], np.array([1.0, -1.0, 0.0, 2.0])[regime]
    if task == "regression":
        y = slope * X[:, 2] + offset + 0.2 * rng.standard_normal(n)
    else:  # noisy labels: the logistic fits stay finite
        y = (slope * X[:, 2] + offset > 0).astype(int)
        y = np.where(rng.random(n) < 0.1, 1 - y, y)
    return X, y


MODELS = {  # name: (estimator, task, regimes)
    "regressor": (lambda: MixtureOfExpertsRegressor(2, **TIGHT), "regression", 2),
    "classifier": (lambda: MixtureOfExpertsClassifier(2, **TIGHT), "classification", 2),
    "hme_regression": (lambda: HierarchicalMixtureOfExperts((2, 2), **TIGHT), "regression", 4),
    "hme_classification": (lambda: HierarchicalMixtureOfExperts((2, 2), task="classification", **TIGHT),
                           "classification", 4),
    "sklearn_experts": (lambda: MixtureOfExpertsRegressor(2, experts=LinearRegression(), **TIGHT),
                        "regression", 2),
}


def _outputs(model, X, y):
    """The mixture's predictions and per-sample log-likelihoods (the same whichever expert is which)."""
    out = model.predict_proba(X) if hasattr(model, "predict_proba") else model.predict(X)
    return np.column_stack([out.reshape(len(X), -1), model.log_likelihood_samples(X, y)])


@pytest.mark.filterwarnings("ignore:EM did not converge")  # the deep trees' last digits, slowly
@pytest.mark.parametrize("name", MODELS)
def test_integer_weights_equal_repeated_rows_and_zero_weights_dropped_rows(name):
    make, task, regimes = MODELS[name]
    X, y = _problem(task, regimes)
    w = np.random.default_rng(1).integers(0, 4, len(y))  # zeros included
    # The weighted rows in another order, for the flat mixtures; a tree's fit also depends on which
    # k-means cluster lands on which leaf, which follows the row order.
    order = np.arange(len(y)) if name.startswith("hme") else np.random.default_rng(2).permutation(len(y))
    weighted = make().fit(X[order], y[order], sample_weight=w[order])
    repeated = make().fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    # The two fits take the same EM steps up to round-off; a deep tree converges slowly enough that
    # round-off can move its stop by a few iterations (a few 1e-5 of log-likelihood).
    np.testing.assert_allclose(weighted.log_likelihood_, repeated.log_likelihood_, rtol=1e-6)
    np.testing.assert_allclose(_outputs(weighted, X, y), _outputs(repeated, X, y), atol=1e-4)
    # The reported log-likelihood is the weighted sum over the training samples.
    np.testing.assert_allclose(weighted.log_likelihood_, w @ weighted.log_likelihood_samples(X, y), rtol=1e-8)


@pytest.mark.filterwarnings("ignore:EM did not converge")
@pytest.mark.parametrize("name", ["regressor", "hme_classification"])
def test_unit_weights_give_the_unweighted_fit(name):
    make, task, regimes = MODELS[name]
    X, y = _problem(task, regimes)
    plain = make().fit(X, y)
    for ones in (np.ones(len(y)), [1] * len(y), 1.0):
        weighted = make().fit(X, y, sample_weight=ones)
        np.testing.assert_allclose(weighted.objective_history_[-1], plain.objective_history_[-1], rtol=1e-10)
        np.testing.assert_allclose(_outputs(weighted, X, y), _outputs(plain, X, y), atol=1e-9)


def test_weights_move_the_fit_toward_the_heavy_samples():
    # One regime only, two experts' worth of data: weighting one half 10x pulls a 1-expert fit there.
    X, y = _problem("regression")
    right = X[:, 0] > 3
    w = np.where(right, 10.0, 0.1)
    fit = MixtureOfExpertsRegressor(1, **TIGHT).fit(X, y, sample_weight=w)
    alone = MixtureOfExpertsRegressor(1, **TIGHT).fit(X[right], y[right])
    plain = MixtureOfExpertsRegressor(1, **TIGHT).fit(X, y)
    assert abs(fit.experts_.coef_[0, 2] - alone.experts_.coef_[0, 2]) < 0.1
    assert abs(plain.experts_.coef_[0, 2] - alone.experts_.coef_[0, 2]) > 0.5


@pytest.mark.parametrize("bad, match", [
    (-np.ones(240), "non-negative"),
    (np.r_[np.nan, np.ones(239)], "finite"),
    (np.ones(239), r"shape \(240,\)"),
    (np.ones((240, 1)), r"shape \(240,\)"),
    (np.zeros(240), "zero for every sample"),
])
def test_bad_weights_are_refused_and_the_fitted_model_kept(bad, match):
    X, y = _problem("regression")
    model = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y)
    before = model.predict(X)
    with pytest.raises(ValueError, match=match):
        model.fit(X, y, sample_weight=bad)
    np.testing.assert_array_equal(model.predict(X), before)


def test_experts_that_cannot_weight_refuse_unequal_weights_only():
    X, y = _problem("classification")
    model = MixtureOfExpertsClassifier(2, experts=KNeighborsClassifier(3), random_state=0)
    with pytest.raises(ValueError, match=r"experts\[0\] \(KNeighborsClassifier\)"):
        model.fit(X, y, sample_weight=np.r_[2.0, np.ones(len(y) - 1)])
    equal = model.fit(X, y, sample_weight=np.ones(len(y))).predict_proba(X)
    np.testing.assert_allclose(equal, MixtureOfExpertsClassifier(
        2, experts=KNeighborsClassifier(3), random_state=0).fit(X, y).predict_proba(X), atol=1e-12)


def test_information_criteria_and_selection_count_weighted_samples():
    X, y = _problem("regression")
    w = np.random.default_rng(1).integers(0, 4, len(y))
    Xr, yr = np.repeat(X, w, axis=0), np.repeat(y, w)
    model = MixtureOfExpertsRegressor(2, **TIGHT).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(model.bic(X, y, sample_weight=w), model.bic(Xr, yr), rtol=1e-10)
    np.testing.assert_allclose(model.aic(X, y, sample_weight=w), model.aic(Xr, yr), rtol=1e-10)
    sel = select_n_experts(MixtureOfExpertsRegressor(**TIGHT), X, y, range(1, 4), sample_weight=w)
    rep = select_n_experts(MixtureOfExpertsRegressor(**TIGHT), Xr, yr, range(1, 4))
    assert sel.best_n_experts == rep.best_n_experts == 2
    np.testing.assert_allclose(list(sel.criterion.values()), list(rep.criterion.values()), rtol=1e-5)


def test_an_expert_without_a_share_starts_from_the_sample_weighted_fit():
    X, y = _problem("regression")
    w = np.random.default_rng(3).integers(0, 4, len(y)).astype(float)
    R = np.zeros((len(y), 2))
    R[:, 0] = w  # expert 1 has no share of its own: it falls back to all samples
    block = EstimatorExperts([LinearRegression(), LinearRegression()], "regression")
    block.m_step(X, y, R, np.ones(2, dtype=bool))
    expect = LinearRegression().fit(X, y, sample_weight=w)
    np.testing.assert_allclose(block.estimators_[1].coef_, expect.coef_, rtol=1e-10)
    np.testing.assert_allclose(block.estimators_[0].coef_, expect.coef_, rtol=1e-10)
