"""Any scikit-learn estimator as an expert, and the factory that turns ``experts=`` into a block.

Soft EM: an estimator whose ``fit`` accepts ``sample_weight`` is refit on all samples with weights
``R[:, k]`` (responsibilities times the mixture's sample weights). Hard (classification) EM: one
that does not is refit on the samples whose most responsible expert is ``k`` (and whose weight is
not 0); such experts cannot weight samples, so a mixture with them refuses unequal sample
weights. A regression expert's density is Gaussian around its prediction with a variance
re-estimated from its weighted residuals; a classification expert's density is its
``predict_proba`` (smoothed by ``_EPS`` so that a 0/1 probability does not give ``log 0``).

Safeguard: a refit is kept only if it does not lower the expert's weighted expected
log-likelihood under the current responsibilities; otherwise the previous fit stays. An arbitrary
learner need not maximise that quantity (a tree, an SVR), and the safeguard is what keeps the EM
log-likelihood from decreasing with such experts. An expert whose share of the data cannot be fit
(no weight at all, or too few samples for e.g. a k-nearest-neighbours expert) keeps its previous
fit; before it has one, it is fit on all samples (with the mixture's sample weights, if any).

Seeds: every ``random_state`` parameter of an expert (nested ones included) left at ``None`` is set
from the mixture's ``random_state``, one seed per expert, so a seeded mixture of random forests or
trees refits identically.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import has_fit_parameter

from .experts import LinearGaussianExperts, LogisticExperts

_LOG_2PI = float(np.log(2.0 * np.pi))
_EPS = 1e-8


def _n_params_of(est) -> int | None:
    """Free parameters of a fitted estimator, where that is well defined (linear models, trees).

    A multinomial logistic regression (scikit-learn's ``LogisticRegression`` / ``LogisticRegressionCV``
    with another solver than liblinear) has one redundant row of its ``C`` coefficient rows: the
    probabilities do not change when the same vector is added to every row, so ``C - 1`` rows count,
    as for the built-in logistic experts. One-vs-rest classifiers (``SGDClassifier``, liblinear)
    count all ``C`` rows: each row's probability is its own.
    """
    try:
        coef = est.coef_
    except AttributeError:
        coef = None
    if coef is not None:
        coef = np.atleast_2d(np.asarray(coef))
        rows, p = coef.shape
        if rows > 1 and rows == len(getattr(est, "classes_", ())) and _multinomial(est):
            rows -= 1
        return int(rows * (p + (1 if getattr(est, "fit_intercept", True) else 0)))
    tree = getattr(est, "tree_", None)
    if tree is not None:
        n_out = tree.value.shape[1] * max(tree.value.shape[2] - 1, 1)
        return int(tree.n_leaves * n_out)
    return None


def _multinomial(est) -> bool:
    """Whether ``est`` is a fitted multinomial (softmax) logistic regression of scikit-learn."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    if not isinstance(est, (LogisticRegression, LogisticRegressionCV)) or est.solver == "liblinear":
        return False
    return getattr(est, "multi_class", "auto") != "ovr"  # the parameter left scikit-learn in 1.8


class EstimatorExperts:
    """K cloned scikit-learn estimators as the experts of one mixture (regression or classification)."""

    def __init__(self, estimators: list, kind: str, *, n_classes: int = 0, variance: str = "per_expert",
                 var_floor: float = 0.0):
        self.templates_ = estimators
        self.n_experts = len(estimators)
        self.kind = kind
        self.n_classes = n_classes
        self.variance = variance
        self.var_floor = var_floor
        self.estimators_: list = [None] * self.n_experts
        self.soft_ = [has_fit_parameter(e, "sample_weight") for e in estimators]
        self._cache = None  # per-expert outputs on the training matrix

    def unweighted(self) -> list[str]:
        """Names of the experts whose ``fit`` takes no ``sample_weight`` (trained by hard EM)."""
        return [f"experts[{k}] ({type(e).__name__})"
                for k, (e, soft) in enumerate(zip(self.templates_, self.soft_)) if not soft]

    # ---- per-expert outputs -------------------------------------------------------------------
    def _output(self, est, X: np.ndarray) -> np.ndarray:
        if self.kind == "regression":
            return np.asarray(est.predict(X), dtype=float).reshape(-1)
        P = np.zeros((X.shape[0], self.n_classes))
        P[:, np.asarray(est.classes_, dtype=int)] = est.predict_proba(X)
        return (P + _EPS) / (1.0 + self.n_classes * _EPS)

    def _score(self, out: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        """Weighted expected log-likelihood of one expert (up to terms that do not depend on it)."""
        if self.kind == "regression":
            return -float(w @ (y - out) ** 2)  # the variance is re-estimated: lower weighted RSS wins
        return float(w @ np.log(out[np.arange(len(y)), y]))

    def _fit_one(self, k: int, X: np.ndarray, y: np.ndarray, R: np.ndarray):
        """A refit of expert ``k`` and its outputs on ``X``, or ``None`` to keep the previous fit."""
        est = clone(self.templates_[k])
        weights = np.ascontiguousarray(R[:, k])
        if self.soft_[k]:
            enough = np.count_nonzero(weights > 0) >= 2
        else:
            mask = (R.argmax(axis=1) == k) & (weights > 0)  # (a sample of weight 0 has R[i] == 0)
            enough = mask.sum() >= 2 and (self.kind == "regression" or np.unique(y[mask]).size >= 2)
        if enough:
            try:
                if self.soft_[k]:
                    est.fit(X, y, sample_weight=weights)
                else:
                    est.fit(X[mask], y[mask])
                return est, self._output(est, X)
            except ValueError:  # e.g. kNN with fewer samples than neighbours
                pass
        if self.estimators_[k] is not None:
            return None  # keep the previous fit
        # Never fitted and nothing of its own that fits: all samples, weighted by the mixture's
        # sample weights (R's row sums) where those differ and the expert can take them.
        sample_weights = R.sum(axis=1)
        if self.soft_[k] and not np.allclose(sample_weights, sample_weights[0], rtol=1e-12, atol=0):
            est.fit(X, y, sample_weight=sample_weights)
        else:
            est.fit(X, y)
        return est, self._output(est, X)

    # ---- the block protocol -------------------------------------------------------------------
    def m_step(self, X: np.ndarray, y: np.ndarray, R: np.ndarray, alive: np.ndarray) -> None:
        n, K = R.shape
        if self._cache is None:  # the current experts' outputs (a warm start has them all), else zeros
            shape = (n, K) if self.kind == "regression" else (n, K, self.n_classes)
            done = all(e is not None for e in self.estimators_)
            self._cache = self.predict(X) if done else np.zeros(shape)
        for k in range(K):
            if not alive[k] and self.estimators_[k] is not None:
                continue
            refit = self._fit_one(k, X, y, R)
            if refit is None:
                continue
            new, out = refit
            old = self.estimators_[k]
            if old is None or self._score(out, y, R[:, k]) >= self._score(self._cache[:, k], y, R[:, k]):
                self.estimators_[k] = new
                self._cache[:, k] = out
        if self.kind == "regression":
            rss = np.einsum("nk,nk->k", R, (y[:, None] - self._cache) ** 2)
            n_k = R.sum(axis=0)
            if self.variance == "shared":
                s2 = np.full(K, rss.sum() / max(n_k.sum(), 1e-300))
            else:
                s2 = rss / np.maximum(n_k, 1e-300)
            s2 = np.maximum(s2, self.var_floor)
            old_s2 = getattr(self, "sigma2_", s2)
            self.sigma2_ = s2 if self.variance == "shared" else np.where(alive, s2, old_s2)

    def predict(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        if train and self._cache is not None:
            return self._cache
        return np.stack([self._output(e, X) for e in self.estimators_], axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.predict(X)

    def log_density(self, X: np.ndarray, y: np.ndarray, train: bool = False) -> np.ndarray:
        out = self.predict(X, train)
        if self.kind == "regression":
            r = y[:, None] - out
            return -0.5 * (_LOG_2PI + np.log(self.sigma2_)) - 0.5 * r * r / self.sigma2_
        return np.log(out[np.arange(len(y)), :, y])

    def log_prior(self) -> float:
        return 0.0

    def n_parameters(self) -> int | None:
        counts = [_n_params_of(e) for e in self.estimators_]
        if any(c is None for c in counts):
            return None
        extra = 0 if self.kind == "classification" else (1 if self.variance == "shared" else self.n_experts)
        return int(sum(counts)) + extra

    def release(self) -> None:
        self._cache = None


def _check_estimator(est, kind: str, where: str) -> None:
    if isinstance(est, type):
        raise TypeError(f"{where} must be an estimator instance, got the class {est.__name__}; "
                        f"write {est.__name__}() instead")
    needed = ["fit", "predict"] if kind == "regression" else ["fit", "predict_proba"]
    for name in needed:
        if not callable(getattr(est, name, None)):
            raise ValueError(f"{where} ({type(est).__name__}) has no {name}() method; a "
                             f"{kind} expert needs {' and '.join(needed)}")


def _seeded(est, rng):
    """``est`` with each ``random_state`` parameter that is ``None`` set to a seed drawn from ``rng``."""
    if rng is None:
        return est
    names = sorted(k for k, v in est.get_params(deep=True).items()
                   if (k == "random_state" or k.endswith("__random_state")) and v is None)
    return est.set_params(**dict.fromkeys(names, int(rng.randint(2**31 - 1)))) if names else est


def make_expert_block(experts, kind: str, n_leaves: int, *, n_classes: int = 0, variance: str,
                      var_floor: float, ridge: float, expert_alpha: float, solver: str, max_iter: int,
                      tol: float = 1e-7, rng=None):
    """Resolve the ``experts=`` parameter into an expert block of ``n_leaves`` experts (estimators get
    their unset ``random_state`` from ``rng``)."""
    builtin = "linear" if kind == "regression" else "logistic"
    if isinstance(experts, str):
        if experts != builtin:
            raise ValueError(f"experts={experts!r} is not allowed for {kind}; use {builtin!r}, an "
                             "estimator instance or a list of them")
        if kind == "regression":
            return LinearGaussianExperts(n_leaves, ridge=ridge, variance=variance, var_floor=var_floor)
        return LogisticExperts(n_leaves, n_classes, alpha=expert_alpha, solver=solver, max_iter=max_iter,
                               tol=tol)
    if isinstance(experts, (list, tuple)):
        if len(experts) != n_leaves:
            raise ValueError(f"experts is a list of {len(experts)} estimators but the model has "
                             f"{n_leaves} experts; pass exactly {n_leaves} or a single estimator")
        for i, e in enumerate(experts):
            _check_estimator(e, kind, f"experts[{i}]")
        estimators = [_seeded(clone(e), rng) for e in experts]
    elif isinstance(experts, (numbers.Number, np.ndarray)) or experts is None:
        raise TypeError(f"experts must be {builtin!r}, an estimator or a list of estimators; got {experts!r}")
    else:
        _check_estimator(experts, kind, "experts")
        estimators = [_seeded(clone(experts), rng) for _ in range(n_leaves)]
    return EstimatorExperts(estimators, kind, n_classes=n_classes, variance=variance, var_floor=var_floor)
