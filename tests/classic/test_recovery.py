"""Parameter recovery on synthetic problems with a known answer."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from moekit.classic import HierarchicalMixtureOfExperts, MixtureOfExpertsClassifier, MixtureOfExpertsRegressor


def _by_slope(moe):
    order = np.argsort(moe.experts_.coef_[:, 0])[::-1]  # slope 2 first, slope -1 second
    return order


def test_two_line_mixture_recovers_lines_noise_and_mixing(two_line_data):
    X, y = two_line_data
    moe = MixtureOfExpertsRegressor(2, gate="constant", random_state=0).fit(X, y)
    k = _by_slope(moe)
    np.testing.assert_allclose(moe.experts_.coef_[k, 0], [2.0, -1.0], atol=0.06)
    np.testing.assert_allclose(moe.experts_.intercept_[k], [1.0, -1.0], atol=0.06)
    np.testing.assert_allclose(np.sqrt(moe.experts_.sigma2_[k]), [0.1, 0.3], rtol=0.15)
    mixing = moe.predict_gate(X[:3])  # the constant gate: the same mixing weights for every x
    np.testing.assert_allclose(mixing, np.tile(mixing[0], (3, 1)))
    np.testing.assert_allclose(mixing[0, k], [0.4, 0.6], atol=0.05)
    assert moe.converged_


def test_gated_mixture_recovers_lines_and_gate_boundary(gated_line_data):
    X, y = gated_line_data
    moe = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y)
    k = _by_slope(moe)
    np.testing.assert_allclose(moe.experts_.coef_[k, 0], [2.0, -1.0], atol=0.1)
    np.testing.assert_allclose(moe.experts_.intercept_[k], [1.0, -1.0], atol=0.1)
    # the gate switches at x = 0: log-odds a x + b with boundary -b/a near 0 and the right sign
    a = moe.gate_coef_[0, k[0]] - moe.gate_coef_[0, k[1]]
    b = moe.gate_intercept_[k[0]] - moe.gate_intercept_[k[1]]
    assert a > 0
    assert abs(-b / a) < 0.05
    grid = np.array([[-1.0], [-0.6], [0.6], [1.0]])
    g = moe.predict_gate(grid)[:, k[0]]
    assert np.all(g[:2] < 0.05) and np.all(g[2:] > 0.95)
    assert moe.score(X, y) > 0.97


def _hierarchical_problem(n: int, seed: int):
    """Depth-3 binary tree of axis splits with *staggered* thresholds (the split of x1 depends on the
    side of x0, that of x2 on both), so no flat softmax partition represents it; leaf j has mean 2j."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 3))
    a = (X[:, 0] >= 0).astype(int)
    b = (X[:, 1] >= np.where(a == 1, 0.5, -0.5)).astype(int)
    c = (X[:, 2] >= np.array([-0.6, 0.2, -0.2, 0.6])[a * 2 + b]).astype(int)
    leaf = a * 4 + b * 2 + c
    return X, 2.0 * leaf + 0.3 * rng.standard_normal(n)


def test_three_level_hme_beats_flat_moe_of_the_same_size():
    X, y = _hierarchical_problem(2000, 0)
    Xt, yt = _hierarchical_problem(2000, 1)
    hme = HierarchicalMixtureOfExperts((2, 2, 2), random_state=0).fit(X, y)
    flat = MixtureOfExpertsRegressor(8, random_state=0).fit(X, y)
    assert hme.n_experts == flat.n_experts == 8
    mse_hme = np.mean((hme.predict(Xt) - yt) ** 2)
    mse_flat = np.mean((flat.predict(Xt) - yt) ** 2)
    assert mse_hme < 0.75 * mse_flat
    assert hme.log_likelihood_samples(Xt, yt).mean() > flat.log_likelihood_samples(Xt, yt).mean()
    # the root gate learned the first split: x0 decides the side of the tree
    left_right = hme.predict_gate(np.array([[-0.8, 0.0, 0.0], [0.8, 0.0, 0.0]]))
    assert left_right[0, :4].sum() > 0.9 and left_right[1, 4:].sum() > 0.9


def _xor_problem(n: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    return X, ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)


def test_piecewise_classification_moe_beats_one_logistic_regression():
    X, y = _xor_problem(800, 0)
    Xt, yt = _xor_problem(800, 1)
    moe = MixtureOfExpertsClassifier(2, gate_features=[0], random_state=0).fit(X, y)
    lr = LogisticRegression().fit(X, y)
    assert lr.score(Xt, yt) < 0.65  # one linear boundary cannot do XOR
    assert moe.score(Xt, yt) > 0.93
    proba = moe.predict_proba(Xt)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert proba.shape == (800, 2)
