"""The EM skeleton: monotone objective, restarts, reproducibility, convergence, outputs, AIC/BIC."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.tree import DecisionTreeRegressor
from threadpoolctl import threadpool_info, threadpool_limits

from moekit.classic import (
    HierarchicalMixtureOfExperts,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
    select_n_experts,
)
from moekit.classic.experts import LinearGaussianExperts
from moekit.classic.tree import aggregate


def _blobs(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    y = (X[:, 0] * X[:, 1] + 0.3 * X[:, 2] > 0).astype(int) + (X[:, 2] > 1)
    return X, y


MODELS = {
    "linear-per-expert": lambda s: MixtureOfExpertsRegressor(3, init="random", random_state=s),
    "linear-shared-ridge": lambda s: MixtureOfExpertsRegressor(
        3, variance="shared", ridge=2.0, random_state=s),
    "linear-lbfgs-gate": lambda s: MixtureOfExpertsRegressor(3, gate_solver="lbfgs", random_state=s),
    "tree-experts": lambda s: MixtureOfExpertsRegressor(
        2, experts=DecisionTreeRegressor(max_depth=2, random_state=0), random_state=s),
    "hme": lambda s: HierarchicalMixtureOfExperts((2, 2), init="random", random_state=s),
    "classifier": lambda s: MixtureOfExpertsClassifier(3, init="random", random_state=s),
    "hme-classifier": lambda s: HierarchicalMixtureOfExperts((2, 2), task="classification", random_state=s),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_objective_never_decreases(name, seed, make_two_lines):
    X, y = _blobs(seed, 200) if "classifier" in name else make_two_lines(300, seed=seed, gated=seed % 2 == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        moe = MODELS[name](seed).set_params(max_iter=30).fit(X, y)
    h = moe.objective_history_
    assert len(h) >= 2
    assert np.all(np.diff(h) >= -1e-8 * np.abs(h[:-1]).clip(1.0)), np.diff(h).min()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_likelihood_never_decreases_without_penalties(seed, make_two_lines):
    X, y = make_two_lines(300, seed=seed, gated=True)
    moe = MixtureOfExpertsRegressor(2, gate_alpha=0.0, init="random", max_iter=60, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        moe.fit(X, y)
    np.testing.assert_array_equal(moe.objective_history_, moe.log_likelihood_history_)
    ll = moe.log_likelihood_history_
    assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[:-1]).clip(1.0))


def test_log_likelihood_attribute_matches_the_returned_parameters(two_line_data):
    X, y = two_line_data
    for max_iter in (3, 200):  # stopped early (final E-step) and converged
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            moe = MixtureOfExpertsRegressor(2, max_iter=max_iter, random_state=0).fit(X, y)
        np.testing.assert_allclose(moe.log_likelihood_, moe.log_likelihood_samples(X, y).sum(), rtol=1e-10)
        assert moe.log_likelihood_ == moe.log_likelihood_history_[-1]


def test_convergence_warning_and_attributes(two_line_data):
    X, y = two_line_data
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        moe = MixtureOfExpertsRegressor(2, init="random", max_iter=2, random_state=0).fit(X, y)
    assert not moe.converged_ and moe.n_iter_ == 2
    moe = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y)
    assert moe.converged_ and 1 < moe.n_iter_ < 200


def test_reproducible_with_random_state_and_n_init_keeps_the_best(make_two_lines):
    X, y = make_two_lines(200)
    a = MixtureOfExpertsRegressor(3, init="random", n_init=3, random_state=7).fit(X, y)
    b = MixtureOfExpertsRegressor(3, init="random", n_init=3, random_state=7).fit(X, y)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    np.testing.assert_array_equal(a.objective_history_, b.objective_history_)
    # the first restart of n_init=3 is the n_init=1 run with the same random_state; the best is kept
    first = MixtureOfExpertsRegressor(3, init="random", n_init=1, random_state=7).fit(X, y)
    assert a.objective_history_[-1] >= first.objective_history_[-1]


def test_outputs_shapes_and_identities(gated_line_data):
    X, y = gated_line_data
    moe = MixtureOfExpertsRegressor(3, random_state=0).fit(X, y)
    gate = moe.predict_gate(X)
    resp = moe.predict_responsibilities(X, y)
    means = moe.predict_experts(X)
    assert gate.shape == resp.shape == means.shape == (len(y), 3)
    np.testing.assert_allclose(gate.sum(axis=1), 1.0)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0)
    np.testing.assert_allclose(moe.predict(X), np.sum(gate * means, axis=1))
    arg = moe.set_params(combine="argmax").predict(X)
    np.testing.assert_allclose(arg, means[np.arange(len(y)), gate.argmax(axis=1)])
    # Bayes' rule: responsibilities = gate * density / mixture density
    dens = np.exp(moe.experts_.log_density(X, y))
    np.testing.assert_allclose(resp, gate * dens / (gate * dens).sum(axis=1, keepdims=True), rtol=1e-9,
                               atol=1e-300)
    np.testing.assert_allclose(moe.log_likelihood_samples(X, y), np.log((gate * dens).sum(axis=1)))


def test_aic_bic_and_parameter_count(gated_line_data):
    X, y = gated_line_data
    moe = MixtureOfExpertsRegressor(3, random_state=0).fit(X, y)
    p = X.shape[1]
    assert moe.n_parameters_ == 3 * (p + 1) + 3 + (p + 1) * (3 - 1)  # experts, variances, gate
    ll = moe.log_likelihood_samples(X, y).sum()
    assert moe.aic(X, y) == pytest.approx(-2 * ll + 2 * moe.n_parameters_)
    assert moe.bic(X, y) == pytest.approx(-2 * ll + np.log(len(y)) * moe.n_parameters_)
    shared = MixtureOfExpertsRegressor(3, variance="shared", gate="constant", random_state=0).fit(X, y)
    assert shared.n_parameters_ == 3 * (p + 1) + 1 + (3 - 1)


def test_select_n_experts_by_bic_finds_two_lines(two_line_data):
    X, y = two_line_data
    base = MixtureOfExpertsRegressor(gate="constant", random_state=0)
    sel = select_n_experts(base, X, y, range(1, 5), n_init=2)
    assert sel.best_n_experts == 2
    assert set(sel.criterion) == {1, 2, 3, 4}
    assert sel.best_estimator.n_experts == 2
    assert sel.criterion[2] < sel.criterion[1]


def test_dead_expert_is_frozen_not_refit():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 2))
    y = X @ np.array([1.0, -1.0])
    block = LinearGaussianExperts(2, ridge=0.0, variance="per_expert", var_floor=1e-9)
    R = np.column_stack([np.ones(50), np.zeros(50)])
    block.m_step(X, y, R, np.array([True, True]))
    frozen_B, frozen_s2 = block.B_[1].copy(), block.sigma2_[1]
    block.m_step(X, 2 * y, R, np.array([True, False]))
    np.testing.assert_array_equal(block.B_[1], frozen_B)
    assert block.sigma2_[1] == frozen_s2
    np.testing.assert_allclose(block.coef_[0], [2.0, -2.0], atol=1e-8)


def test_em_m_step_freezes_an_expert_without_responsibility(gated_line_data):
    X, y = gated_line_data
    moe = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y)
    moe.set_params(gate_max_iter=100)  # let this one gate M-step run to its optimum
    before = moe.experts_.B_.copy()
    R = np.zeros((len(y), 2))
    R[:, 0] = 1.0  # expert 1 lost every sample
    alive = moe._m_step(moe.experts_, moe.gates_, X, y, moe._gate_design(X), aggregate(R, (2,)), len(y))
    np.testing.assert_array_equal(alive, [True, False])
    np.testing.assert_array_equal(moe.experts_.B_[1], before[1])
    assert not np.array_equal(moe.experts_.B_[0], before[0])  # refit on all the data
    assert moe.predict_gate(X)[:, 1].max() < 1e-3  # and the gate routes nothing to the frozen one


def test_classifier_argmax_combination_uses_the_top_gate_expert():
    X, y = _blobs(0, 200)
    clf = MixtureOfExpertsClassifier(3, random_state=0).fit(X, y)
    gate = clf.predict_gate(X)
    P = clf.experts_.predict_proba(X)  # (n, K, C)
    np.testing.assert_allclose(clf.predict_proba(X), np.einsum("nk,nkc->nc", gate, P))
    clf.set_params(combine="argmax")
    np.testing.assert_allclose(clf.predict_proba(X), P[np.arange(len(y)), gate.argmax(axis=1)])
    assert set(clf.predict(X)) <= set(clf.classes_)


def test_hme_with_estimator_experts_and_constant_gate(gated_line_data):
    X, y = gated_line_data
    hme = HierarchicalMixtureOfExperts((2, 2), experts=DecisionTreeRegressor(max_depth=2, random_state=0),
                                       random_state=0).fit(X, y)
    assert len(hme.experts_.estimators_) == 4
    assert hme.predict_experts(X).shape == (len(y), 4)
    assert [c.shape for c in hme.gate_coefs_] == [(1, 1, 2), (2, 1, 2)]
    assert hme.score(X, y) > 0.9
    flat_mix = HierarchicalMixtureOfExperts((2, 2), gate="constant", random_state=0).fit(X, y)
    g = flat_mix.predict_gate(X)
    np.testing.assert_allclose(g, np.tile(g[0], (len(y), 1)))  # mixing weights do not depend on x
    assert not hasattr(hme, "predict_proba")  # a regression HME has no probabilities


@pytest.mark.filterwarnings("ignore:EM did not converge")
@pytest.mark.parametrize("blas_threads, expected", [(1, 1), (2, 2), (None, 3)])
def test_blas_threads_during_em_with_built_in_experts(monkeypatch, gated_line_data, blas_threads, expected):
    seen = []
    m_step = LinearGaussianExperts.m_step

    def recording(self, *args):
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return m_step(self, *args)

    monkeypatch.setattr(LinearGaussianExperts, "m_step", recording)
    X, y = gated_line_data
    with threadpool_limits(limits=3, user_api="blas"):  # the caller's own setting
        MixtureOfExpertsRegressor(2, random_state=0, max_iter=3, blas_threads=blas_threads).fit(X, y)
        after = {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    assert seen and all(s == {expected} for s in seen)
    assert after == {3}  # restored after the fit


@pytest.mark.filterwarnings("ignore:EM did not converge")
@pytest.mark.parametrize("make", [
    lambda **kw: MixtureOfExpertsRegressor(2, random_state=0, tol=1e-9, **kw),
    lambda **kw: HierarchicalMixtureOfExperts((2, 2), task="classification", random_state=0, tol=1e-9, **kw),
    # Forests seeded from a RandomState the first fit has drawn from: the warm run keeps their seeds.
    lambda **kw: MixtureOfExpertsRegressor(2, experts=RandomForestRegressor(n_estimators=3, max_depth=2),
                                           random_state=np.random.RandomState(0), tol=1e-9, **kw),
])
def test_warm_start_continues_the_em_run_where_it_stopped(gated_line_data, make):
    X, y = gated_line_data
    if "classification" in repr(make()):
        y = (y > 0).astype(int)
    full = make(max_iter=60).fit(X, y)
    part = make(max_iter=4).fit(X, y)
    part.set_params(warm_start=True, max_iter=56)
    part.fit(X, y)
    # The continued run's first E-step sees the parameters the 4-iteration fit returned, which is
    # the full run's 5th E-step; from there both take the same steps.
    n = len(part.objective_history_)
    np.testing.assert_allclose(part.objective_history_, full.objective_history_[4:4 + n], rtol=1e-10)
    np.testing.assert_allclose(part.log_likelihood_, full.log_likelihood_, rtol=1e-10)


def test_warm_start_refuses_a_changed_problem_and_keeps_the_fit(gated_line_data):
    X, y = gated_line_data
    model = MixtureOfExpertsRegressor(2, random_state=0, warm_start=True).fit(X, y)
    before = model.predict(X)
    for change, data in [({}, (np.hstack([X, X]), y)), ({"n_experts": 3}, (X, y)),
                         ({"gate": "constant"}, (X, y)), ({"experts": DecisionTreeRegressor()}, (X, y))]:
        model.set_params(**change)
        with pytest.raises(ValueError, match="warm_start=True cannot continue the previous fit"):
            model.fit(*data)
        np.testing.assert_array_equal(model.predict(X), before)
        model.set_params(n_experts=2, gate="softmax", experts="linear")
    model.set_params(warm_start=False, n_experts=3).fit(X, y)  # a fresh start takes any change
    assert model.predict_gate(X).shape == (len(y), 3)


def test_warm_start_with_new_data_of_the_same_shape(make_two_lines):
    X, y = make_two_lines(gated=True, seed=0)
    X2, y2 = make_two_lines(gated=True, seed=1)
    model = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y)
    warm = MixtureOfExpertsRegressor(2, random_state=0).fit(X, y).set_params(warm_start=True).fit(X2, y2)
    cold = MixtureOfExpertsRegressor(2, random_state=0).fit(X2, y2)
    assert warm.converged_ and warm.n_iter_ <= cold.n_iter_  # it starts next to the answer
    np.testing.assert_allclose(np.sort(warm.experts_.coef_.ravel()), np.sort(cold.experts_.coef_.ravel()),
                               atol=1e-3)
    assert not np.allclose(model.experts_.coef_, warm.experts_.coef_)
