"""Experts against plain references, the gate solver, the tree passes, and any-estimator experts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp as scipy_logsumexp
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.svm import SVR
from sklearn.tree import DecisionTreeClassifier

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.classic import softmax as sm
from moekit.classic._logsumexp import logsumexp
from moekit.classic.experts import LinearGaussianExperts, LogisticExperts
from moekit.classic.tree import aggregate, downward, path_log_prob, upward


@pytest.fixture
def weighted_problem():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 3)) + 5.0  # offset: the batched solve centres internally
    y = X @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(120)
    R = rng.dirichlet(np.ones(3), size=120)
    return X, y, R


@pytest.mark.parametrize("ridge", [0.0, 3.0])
def test_batched_weighted_least_squares_matches_sklearn_per_expert(weighted_problem, ridge):
    X, y, R = weighted_problem
    block = LinearGaussianExperts(3, ridge=ridge, variance="per_expert", var_floor=1e-12)
    block.m_step(X, y, R, np.ones(3, dtype=bool))
    for k in range(3):
        ref = (Ridge(alpha=ridge) if ridge else LinearRegression()).fit(X, y, sample_weight=R[:, k])
        np.testing.assert_allclose(block.coef_[k], ref.coef_, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(block.intercept_[k], ref.intercept_, rtol=1e-7, atol=1e-9)
        rss = R[:, k] @ (y - ref.predict(X)) ** 2
        expect = (rss + ridge * ref.coef_ @ ref.coef_) / (R[:, k].sum() + (3 if ridge else 0))
        np.testing.assert_allclose(block.sigma2_[k], expect, rtol=1e-7)


def test_shared_variance_and_floor(weighted_problem):
    X, y, R = weighted_problem
    block = LinearGaussianExperts(3, ridge=0.0, variance="shared", var_floor=1e-12)
    block.m_step(X, y, R, np.ones(3, dtype=bool))
    resid = y[:, None] - block.predict(X)
    np.testing.assert_allclose(block.sigma2_, np.sum(R * resid**2) / R.sum())
    floored = LinearGaussianExperts(3, ridge=0.0, variance="per_expert", var_floor=50.0)
    floored.m_step(X, y, R, np.ones(3, dtype=bool))
    np.testing.assert_array_equal(floored.sigma2_, 50.0)


def test_logistic_experts_match_sklearn_weighted_logistic_regression():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 2)) * [1.0, 3.0] + 1.0
    y = rng.integers(0, 3, 200)
    X[y == 1] += 1.5
    R = rng.dirichlet(np.ones(2), size=200)
    block = LogisticExperts(2, 3, alpha=0.5, solver="newton", max_iter=50, tol=1e-12)
    block.m_step(X, y, R, np.ones(2, dtype=bool))
    Z = (X - X.mean(axis=0)) / X.std(axis=0)  # the experts standardise internally
    for k in range(2):
        ref = LogisticRegression(C=1 / 0.5, tol=1e-10, max_iter=1000).fit(Z, y, sample_weight=R[:, k])
        np.testing.assert_allclose(block.predict_proba(X)[:, k], ref.predict_proba(Z), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 60), experts=st.integers(1, 3), ridge=st.sampled_from([0.0, 2.0]),
       variance=st.sampled_from(["per_expert", "shared"]), seed=st.integers(0, 2**16))
def test_expert_m_steps_treat_an_integer_weight_as_repeated_rows(n, experts, ridge, variance, seed):
    # R times the sample weights (what EM hands the blocks) vs the rows repeated: the same fit.
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 2)) + 3.0
    y = X @ np.array([1.0, -0.5]) + rng.standard_normal(n)
    labels = rng.integers(0, 3, n)
    R = rng.dirichlet(np.ones(experts), size=n)
    w = rng.integers(0, 4, n)
    w[0] = 1  # some weight
    alive = np.ones(experts, dtype=bool)
    rep = lambda a: np.repeat(a, w, axis=0)  # noqa: E731
    lin_w = LinearGaussianExperts(experts, ridge=ridge, variance=variance, var_floor=1e-9)
    lin_r = LinearGaussianExperts(experts, ridge=ridge, variance=variance, var_floor=1e-9)
    lin_w.m_step(X, y, R * w[:, None], alive)
    lin_r.m_step(rep(X), rep(y), rep(R), alive)
    np.testing.assert_allclose(lin_w.coef_, lin_r.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(lin_w.intercept_, lin_r.intercept_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(lin_w.sigma2_, lin_r.sigma2_, rtol=1e-8)
    log_w = LogisticExperts(experts, 3, alpha=0.5, solver="newton", max_iter=30, tol=1e-12)
    log_r = LogisticExperts(experts, 3, alpha=0.5, solver="newton", max_iter=30, tol=1e-12)
    log_w.m_step(X, labels, R * w[:, None], alive)
    log_r.m_step(rep(X), rep(labels), rep(R), alive)
    np.testing.assert_allclose(log_w.predict_proba(X), log_r.predict_proba(X), atol=1e-8)


def _softmax_problem(n=300, d=3, C=4, seed=0):
    rng = np.random.default_rng(seed)
    Z1 = np.hstack([rng.standard_normal((n, d)), np.ones((n, 1))])
    T = rng.dirichlet(np.ones(C), size=n) * rng.uniform(0.2, 1.0, (n, 1))  # soft targets, weighted rows
    return Z1, T


def test_softmax_hessian_matches_finite_differences_of_the_gradient():
    Z1, T = _softmax_problem(n=50)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 4))
    w = T.sum(axis=1)

    def grad(W):
        return sm._gradient(W, Z1, T, w, 0.7, np.exp(sm._evaluate(W, Z1, T, w, 0.7)[1])).T.ravel()

    H = sm._hessian(Z1, np.exp(sm._evaluate(W, Z1, T, w, 0.7)[1]), w, 0.7)
    eps = 1e-6
    num = np.empty_like(H)
    for i in range(H.shape[0]):
        e = np.zeros(H.shape[0])
        e[i] = eps
        num[:, i] = (grad(W + e.reshape(4, 4).T) - grad(W - e.reshape(4, 4).T)) / (2 * eps)
    np.testing.assert_allclose(H, num, atol=1e-6)


def test_softmax_solvers_agree_and_subsampled_hessian_reaches_the_same_optimum(monkeypatch):
    Z1, T = _softmax_problem()
    W0 = np.zeros((4, 4))
    newton = sm.fit_softmax(Z1, T, W0, alpha=0.3, solver="newton", max_iter=100, tol=1e-14)
    lbfgs = sm.fit_softmax(Z1, T, W0, alpha=0.3, solver="lbfgs", max_iter=2000, tol=1e-12)
    np.testing.assert_allclose(sm.log_softmax_predict(Z1, newton), sm.log_softmax_predict(Z1, lbfgs),
                               atol=1e-4)
    monkeypatch.setattr(sm, "_HESSIAN_ROWS", 40)
    sub = sm.fit_softmax(Z1, T, W0, alpha=0.3, solver="newton", max_iter=200, tol=1e-14)
    np.testing.assert_allclose(sub, newton, atol=1e-6)
    assert sm.softmax_objective(newton, Z1, T, 0.3) <= sm.softmax_objective(W0, Z1, T, 0.3)


def test_logsumexp_matches_scipy():
    rng = np.random.default_rng(0)
    for shape, axis in [((40, 4), 1), ((10, 3, 2), 2), ((5, 50), 1), ((6, 1), 1)]:
        a = rng.standard_normal(shape) * 50
        a.flat[0] = -np.inf
        np.testing.assert_allclose(logsumexp(a, axis), scipy_logsumexp(a, axis), rtol=1e-12)
    assert np.all(logsumexp(np.full((2, 3), -np.inf), 1) == -np.inf)


@pytest.mark.parametrize("branching", [(3,), (2, 3), (2, 2, 2)])
def test_upward_downward_match_brute_force_path_enumeration(branching):
    rng = np.random.default_rng(0)
    n = 7
    sizes = [1]
    for b in branching:
        sizes.append(sizes[-1] * b)
    log_gates = []
    for m, b in zip(sizes[:-1], branching):
        g = rng.dirichlet(np.ones(b), size=(n, m))
        log_gates.append(np.log(g))
    log_leaf = rng.standard_normal((n, sizes[-1]))
    # reference: loop over every root-to-leaf path
    path = np.zeros((n, sizes[-1]))
    for leaf, digits in enumerate(itertools.product(*[range(b) for b in branching])):
        node = 0
        for l, c in enumerate(digits):
            path[:, leaf] += log_gates[l][:, node, c]
            node = node * branching[l] + c
    joint = np.exp(path + log_leaf)
    log_lik = upward(log_gates, log_leaf)
    post = downward(log_gates, log_lik)
    np.testing.assert_allclose(path_log_prob(log_gates), path)
    np.testing.assert_allclose(np.exp(log_lik[0][:, 0]), joint.sum(axis=1))
    np.testing.assert_allclose(np.exp(post[-1]), joint / joint.sum(axis=1, keepdims=True))
    for l, level in enumerate(aggregate(np.exp(post[-1]), branching)):
        np.testing.assert_allclose(np.exp(post[l]), level)  # children sum to their parent


@settings(max_examples=25, deadline=None)
@given(branching=st.lists(st.integers(2, 3), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_tree_passes_are_a_probability_calculus(branching, seed):
    """Property: leaf posteriors sum to 1, every level sums to 1, and the root likelihood equals the
    gate-path-weighted sum of the leaf likelihoods."""
    rng = np.random.default_rng(seed)
    n, sizes = 5, [1]
    for b in branching:
        sizes.append(sizes[-1] * b)
    log_gates = [np.log(rng.dirichlet(np.ones(b), size=(n, m))) for m, b in zip(sizes[:-1], branching)]
    log_leaf = rng.normal(scale=5.0, size=(n, sizes[-1]))
    log_lik = upward(log_gates, log_leaf)
    post = downward(log_gates, log_lik)
    for level in post:
        np.testing.assert_allclose(np.exp(level).sum(axis=1), 1.0)
    np.testing.assert_allclose(log_lik[0][:, 0], scipy_logsumexp(path_log_prob(log_gates) + log_leaf, axis=1))


def test_heterogeneous_experts_svr_and_linear_regression():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, 400)
    y = np.where(x < 0, np.sin(3 * x) * 2, 0.5 * x + 2) + 0.05 * rng.standard_normal(400)
    X = x[:, None]
    moe = MixtureOfExpertsRegressor(2, experts=[SVR(C=10.0), LinearRegression()], random_state=0).fit(X, y)
    est = moe.experts_.estimators_
    assert isinstance(est[0], SVR) and isinstance(est[1], LinearRegression)
    assert moe.score(X, y) > 0.95
    assert moe.score(X, y) > LinearRegression().fit(X, y).score(X, y) + 0.3
    right = moe.predict_gate(np.array([[2.0]]))[0]
    assert right[1] > 0.9  # the linear expert owns the linear half
    with pytest.raises(ValueError, match="parameter count"):
        moe.bic(X, y)  # an SVR has no well-defined number of parameters


def test_estimator_without_sample_weight_uses_hard_em(make_two_lines):
    X, y = make_two_lines(400, gated=True)
    moe = MixtureOfExpertsRegressor(2, experts=KNeighborsRegressor(10), random_state=0).fit(X, y)
    assert moe.experts_.soft_ == [False, False]
    assert moe.score(X, y) > 0.95


def test_classifier_with_tree_experts_and_parameter_count():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (400, 2))
    y = np.array(["a", "b"])[((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)]
    moe = MixtureOfExpertsClassifier(2, experts=DecisionTreeClassifier(max_depth=1), gate_features=[0],
                                     random_state=0).fit(X, y)
    assert moe.score(X, y) > 0.95
    assert list(moe.classes_) == ["a", "b"]
    leaves = sum(e.tree_.n_leaves for e in moe.experts_.estimators_)  # one free probability per leaf
    assert moe.n_parameters_ == leaves + 2 * (2 - 1)  # + gate: (1 feature + intercept) x (K - 1)
    assert np.isfinite(moe.aic(X, y))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_linear_experts_do_not_depend_on_the_units_of_a_feature(make_two_lines, scale):
    """The stabilising jitter is relative to each feature's own scale: with ridge=0 the fit is exact
    weighted least squares in any units (one expert = ordinary least squares)."""
    X, y = make_two_lines(400, gated=True)
    ols = LinearRegression().fit(X * scale, y)
    one = MixtureOfExpertsRegressor(1, random_state=0).fit(X * scale, y)
    np.testing.assert_allclose(one.experts_.coef_[0] * scale, ols.coef_ * scale, rtol=1e-8)
    np.testing.assert_allclose(one.experts_.intercept_[0], ols.intercept_, rtol=1e-8)
    two = MixtureOfExpertsRegressor(2, random_state=0).fit(X * scale, y)
    ref = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y)
    np.testing.assert_allclose(two.experts_.coef_ * scale, ref.experts_.coef_, rtol=1e-6)
    np.testing.assert_allclose(two.experts_.intercept_, ref.experts_.intercept_, rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore:experts .* were frozen:UserWarning")  # 6 kNN experts, 50 samples
def test_sklearn_experts_that_cannot_fit_their_share_fall_back():
    """An expert left without weight (k-means on a binary feature) or with fewer samples than a kNN's
    neighbours keeps its previous fit, or is fit on all samples before it has one."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 2, (200, 1)).astype(float)
    y = (rng.uniform(size=200) < 0.3 + 0.4 * X[:, 0]).astype(int)
    for experts in (LogisticRegression(), DecisionTreeClassifier(max_depth=2)):
        moe = MixtureOfExpertsClassifier(3, experts=experts, random_state=0).fit(X, y)
        assert np.allclose(moe.predict_proba(X).sum(axis=1), 1.0)
    x = rng.uniform(-2, 2, 50)
    y = np.where(x > 0, 2 * x, -x) + 0.1 * rng.standard_normal(50)
    for seed in range(5):
        moe = MixtureOfExpertsRegressor(6, experts=KNeighborsRegressor(), random_state=seed)
        assert np.isfinite(moe.fit(x[:, None], y).predict(x[:, None])).all()


def test_random_state_seeds_stochastic_experts():
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = np.where(X[:, 0] > 0, X[:, 1], -X[:, 2]) + 0.1 * rng.standard_normal(300)
    forest = RandomForestRegressor(n_estimators=5, max_depth=3)
    fits = [MixtureOfExpertsRegressor(2, experts=forest, random_state=0).fit(X, y) for _ in range(2)]
    np.testing.assert_array_equal(fits[0].predict(X), fits[1].predict(X))
    seeds = [e.random_state for e in fits[0].experts_.estimators_]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]  # one seed per expert
    assert forest.random_state is None  # the user's template is untouched
    mine = RandomForestRegressor(n_estimators=5, max_depth=3, random_state=7)
    moe = MixtureOfExpertsRegressor(2, experts=mine, random_state=0).fit(X, y)
    assert [e.random_state for e in moe.experts_.estimators_] == [7, 7]  # an explicit seed is kept


def test_multinomial_sklearn_experts_count_like_the_builtin_ones():
    """A multinomial LogisticRegression has C coefficient rows but C - 1 free ones."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    for n_classes in (2, 3):
        y = rng.integers(0, n_classes, 400)
        builtin = MixtureOfExpertsClassifier(2, random_state=0).fit(X, y)
        wrapped = MixtureOfExpertsClassifier(2, experts=LogisticRegression(), random_state=0).fit(X, y)
        assert wrapped.n_parameters_ == builtin.n_parameters_ == 2 * (n_classes - 1) * 4 + 4
    flat = MixtureOfExpertsRegressor(2, experts=LinearRegression(fit_intercept=False), random_state=0)
    assert flat.fit(X, X[:, 0]).n_parameters_ == 2 * 3 + 2 + 4  # slopes, variances, gate


def test_one_vs_rest_sklearn_experts_count_every_class_row():
    """SGDClassifier fits one row per class, each free (a shared shift changes predict_proba)."""
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(400, 3)), rng.integers(0, 3, 400)
    model = MixtureOfExpertsClassifier(2, experts=SGDClassifier(loss="log_loss", random_state=0),
                                       random_state=0).fit(X, y)
    assert model.experts_.estimators_[0].coef_.shape == (3, 3)
    assert model.n_parameters_ == 2 * 3 * 4 + 4  # 2 experts x 3 rows x (3 + 1), gate 3 + 1
