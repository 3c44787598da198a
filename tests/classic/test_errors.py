"""Bad input raises ValueError/TypeError naming the field and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from moekit.classic import HierarchicalMixtureOfExperts, MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

X = np.linspace(-1, 1, 40)[:, None]
Y = 2 * X[:, 0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_X_or_y(bad):
    Xb = X.copy()
    Xb[3, 0] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        MixtureOfExpertsRegressor().fit(Xb, Y)
    Yb = Y.copy()
    Yb[5] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        MixtureOfExpertsRegressor().fit(X, Yb)
    moe = MixtureOfExpertsRegressor(random_state=0).fit(X, Y)
    with pytest.raises(ValueError, match="NaN|infinity"):
        moe.predict_responsibilities(X, Yb)


def test_fewer_samples_than_experts():
    with pytest.raises(ValueError, match="fewer samples than experts"):
        MixtureOfExpertsRegressor(5).fit(X[:4], Y[:4])
    with pytest.raises(ValueError, match="fewer samples than experts"):
        HierarchicalMixtureOfExperts((2, 3)).fit(X[:5], Y[:5])


class NoFit:
    def predict(self, X):
        return np.zeros(len(X))

    def get_params(self, deep=True):
        return {}


def test_expert_without_fit_or_predict_proba():
    with pytest.raises(ValueError, match=r"experts \(NoFit\) has no fit\(\) method"):
        MixtureOfExpertsRegressor(2, experts=NoFit()).fit(X, Y)
    with pytest.raises(ValueError, match=r"has no predict_proba\(\)"):
        MixtureOfExpertsClassifier(2, experts=LinearRegression()).fit(X, (Y > 0).astype(int))
    with pytest.raises(TypeError, match="instance"):
        MixtureOfExpertsRegressor(2, experts=LinearRegression).fit(X, Y)


def test_expert_list_length_must_match_n_experts():
    with pytest.raises(ValueError, match="list of 3 estimators but the model has 2 experts"):
        MixtureOfExpertsRegressor(2, experts=[LinearRegression()] * 3).fit(X, Y)
    with pytest.raises(ValueError, match="list of 2 estimators but the model has 4 experts"):
        HierarchicalMixtureOfExperts((2, 2), experts=[LinearRegression()] * 2).fit(X, Y)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (dict(n_experts=0), "n_experts must be >= 1"),
        (dict(n_experts=2.5), "n_experts must be an integer"),
        (dict(gate="tree"), "gate must be one of"),
        (dict(gate_solver="sgd"), "gate_solver must be one of"),
        (dict(init="pca"), "init must be one of"),
        (dict(combine="median"), "combine must be one of"),
        (dict(variance="diag"), "variance must be one of"),
        (dict(gate_alpha=-1.0), "gate_alpha must be >= 0"),
        (dict(ridge=-1.0), "ridge must be >= 0"),
        (dict(variance_floor=0.0), "variance_floor must be > 0"),
        (dict(tol=-1e-3), "tol must be >= 0"),
        (dict(max_iter=0), "max_iter must be >= 1"),
        (dict(blas_threads=0), "blas_threads must be >= 1"),
        (dict(blas_threads="all"), "blas_threads must be an integer"),
        (dict(experts="logistic"), "experts='logistic' is not allowed for regression"),
        (dict(gate_features=[3]), "gate_features indices must lie in"),
        (dict(gate_features=[]), "selects no column"),
        (dict(gate_features=[True, False]), "boolean mask must have length"),
    ],
)
def test_invalid_parameters_name_the_field(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MixtureOfExpertsRegressor(**{"n_experts": 2, **params}).fit(X, Y)


def test_invalid_hme_and_classifier_inputs():
    with pytest.raises(ValueError, match="branching must be a non-empty tuple of integers >= 2"):
        HierarchicalMixtureOfExperts((2, 1)).fit(X, Y)
    with pytest.raises(ValueError, match="task must be one of"):
        HierarchicalMixtureOfExperts(task="ranking").fit(X, Y)
    with pytest.raises(ValueError, match="only one class"):
        MixtureOfExpertsClassifier().fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(ValueError, match="Unknown label type"):
        MixtureOfExpertsClassifier().fit(X, Y)
    clf = MixtureOfExpertsClassifier(random_state=0).fit(X, (Y > 0).astype(int))
    with pytest.raises(ValueError, match="labels not seen in fit"):
        clf.predict_responsibilities(X, np.full(len(X), 7))
    with pytest.raises(ValueError, match="features"):
        clf.predict(np.ones((3, 2)))


def _refit_cases():
    """(fitted estimator, X it was fitted on, a refit call that raises, the error it raises)."""
    Xc = np.linspace(-1, 1, 40)[:, None]
    yc = (Xc[:, 0] > 0).astype(int)
    reg = MixtureOfExpertsRegressor(2, random_state=0).fit(X, Y)
    clf = MixtureOfExpertsClassifier(2, random_state=0).fit(Xc, yc)
    hme = HierarchicalMixtureOfExperts((2,), random_state=0).fit(X, Y)
    return [
        (reg, X, lambda m: m.fit(np.hstack([X, X]), np.full(40, np.nan)), ValueError),
        (clf, Xc, lambda m: m.fit(np.hstack([Xc, Xc]), np.zeros(40)), ValueError),  # one class
        # the task switches to classification, the refit on continuous y is refused
        (hme, X, lambda m: m.set_params(task="classification").fit(X, Y), ValueError),
    ]


@pytest.mark.parametrize("case", range(3), ids=["regressor", "classifier", "hme-task-switch"])
def test_a_refused_refit_leaves_the_fitted_model_as_it_was(case):
    moe, Xf, refit, error = _refit_cases()[case]
    before = moe.predict(Xf)
    n_features = moe.n_features_in_
    with pytest.raises(error):
        refit(moe)
    np.testing.assert_array_equal(moe.predict(Xf), before)
    assert moe.n_features_in_ == n_features


def test_single_class_message_shows_the_label_plainly():
    with pytest.raises(ValueError, match=r"only one class \(0\.0\)"):
        MixtureOfExpertsClassifier(2).fit(X, np.zeros(40))


@pytest.mark.parametrize("make", [
    lambda: MixtureOfExpertsRegressor(2, init="random", max_iter=2, random_state=0),
    lambda: HierarchicalMixtureOfExperts((2,), init="random", max_iter=2, random_state=0),
], ids=["flat", "hme"])
def test_fit_warnings_point_at_the_callers_line(make):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = np.random.default_rng(0).uniform(-2, 2, (200, 1))
        make().fit(x, np.where(x[:, 0] > 0, 2 * x[:, 0], -x[:, 0]) + np.sin(7 * x[:, 0]))
    assert caught, "expected a ConvergenceWarning"
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]
