"""``MixtureOfExpertsRegressor``: a softmax-gated mixture of regression experts fitted by EM."""

from __future__ import annotations

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.utils.validation import column_or_1d, validate_data

from .base import _BaseMixtureOfExperts, _choice, _number
from .wrapped import make_expert_block


class _RegressionPart:
    """Regression-specific pieces, shared by the flat regressor and the hierarchical model."""

    def _kind(self) -> str:
        return "regression"

    def _experts_spec(self):
        return self.experts

    def _make_block(self, n_leaves: int, var_floor: float, rng):
        _choice("variance", self.variance, ("per_expert", "shared"))
        _number("ridge", self.ridge, low=0.0)
        return make_expert_block(self._experts_spec(), "regression", n_leaves, variance=self.variance,
                                 var_floor=var_floor, ridge=self.ridge, expert_alpha=0.0,
                                 solver=self.gate_solver, max_iter=self.gate_max_iter, rng=rng)

    def _fit_regression(self, X, y, sample_weight=None):
        _number("variance_floor", self.variance_floor, low=0.0, strict=True)
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64, ensure_min_samples=2)
        return self._fit_em(X, np.asarray(y, dtype=np.float64), sample_weight)

    def _encode_y(self, y) -> np.ndarray:
        y = column_or_1d(np.asarray(y, dtype=np.float64), warn=True)
        if not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinity")
        return y

    def _predict_regression(self, X) -> np.ndarray:
        X = self._check_X(X)
        means = self.experts_.predict(X)  # (n, K)
        gate = np.exp(self._log_path(X))
        if self.combine == "argmax":
            return means[np.arange(X.shape[0]), gate.argmax(axis=1)]
        return np.sum(gate * means, axis=1)


class MixtureOfExpertsRegressor(_RegressionPart, RegressorMixin, _BaseMixtureOfExperts):
    """Mixture of regression experts with a softmax gate, fitted by EM (Jacobs et al. 1991).

    ``p(y | x) = sum_k g_k(x) N(y; f_k(x), sigma_k^2)`` with ``g = softmax`` of a linear function of
    the gate features. ``predict`` returns ``sum_k g_k(x) f_k(x)`` (``combine="mean"``) or the
    prediction of the most probable expert (``combine="argmax"``).

    Parameters
    ----------
    n_experts : number of experts K.
    experts : ``"linear"`` (built-in Gaussian linear experts, batched weighted least squares), one
        scikit-learn regressor (cloned K times) or a list of K regressors. Estimators whose ``fit``
        accepts ``sample_weight`` are trained by soft EM, the others by hard EM on the samples they win.
    gate : ``"softmax"`` (multinomial logit on ``gate_features``) or ``"constant"`` (mixing weights
        that do not depend on x: a plain mixture of regressions).
    gate_features : columns the gate sees (indices or a boolean mask); ``None`` = all.
    gate_alpha : L2 penalty of the gate on standardised gate features (intercepts unpenalised).
    gate_solver : ``"newton"`` (IRLS with line search) or ``"lbfgs"``.
    gate_max_iter : Newton (or L-BFGS) iterations per M-step; warm started, and a partial M-step
        that improves the gate keeps EM monotone (a generalised EM), so a few suffice.
    variance : ``"per_expert"`` or ``"shared"`` noise variance.
    ridge : ridge penalty of the built-in linear experts (intercepts unpenalised).
    variance_floor : lower bound on every noise variance, relative to ``var(y)``.
    combine : ``"mean"`` or ``"argmax"`` (see above).
    init : ``"kmeans"`` (k-means on standardised ``[X, y]``) or ``"random"`` responsibilities.
    n_init, max_iter, tol, random_state : EM restarts, iteration cap, convergence threshold on the
        gain of the penalised log-likelihood per sample, seed.
    warm_start : if True, ``fit`` continues EM from the previous fit's experts and gates (one run,
        ``n_init`` unused) instead of a fresh start, e.g. after a ``ConvergenceWarning``; the data
        must have the same features (and classes), and the experts, the tree, ``gate`` and
        ``gate_features`` must be unchanged (else ``ValueError``). Other settings apply from then on.
    blas_threads : numpy BLAS threads during a fit with the built-in experts (default 1: their
        tall-skinny products gain little from threads, and on a busy machine extra threads
        spin-wait); ``None`` leaves the process's settings alone (e.g. a large fit on an idle
        many-core machine). With scikit-learn estimators as experts the settings are always left alone.

    Attributes
    ----------
    experts_ : the fitted expert block; for ``experts="linear"`` it has ``coef_`` ``(K, n_features)``,
        ``intercept_`` ``(K,)`` and ``sigma2_`` ``(K,)``; otherwise ``estimators_`` (K fitted estimators).
    gate_coef_ ``(n_gate_features, K)``, gate_intercept_ ``(K,)`` : the gate in original units.
    converged_, n_iter_, log_likelihood_ (total over the training samples), objective_history_,
    log_likelihood_history_, n_parameters_ (None if the experts have no parameter count),
    dead_experts_ ``(K,)`` bool, n_features_in_.
    """

    def __init__(self, n_experts: int = 2, *, experts="linear", gate: str = "softmax", gate_features=None,
                 gate_alpha: float = 0.01, gate_solver: str = "newton", gate_max_iter: int = 3,
                 variance: str = "per_expert", ridge: float = 0.0, variance_floor: float = 1e-6,
                 combine: str = "mean", init: str = "kmeans", n_init: int = 1, max_iter: int = 200,
                 tol: float = 1e-5, random_state=None, warm_start: bool = False,
                 blas_threads: int | None = 1):
        self.n_experts = n_experts
        self.experts = experts
        self.gate = gate
        self.gate_features = gate_features
        self.gate_alpha = gate_alpha
        self.gate_solver = gate_solver
        self.gate_max_iter = gate_max_iter
        self.variance = variance
        self.ridge = ridge
        self.variance_floor = variance_floor
        self.combine = combine
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.warm_start = warm_start
        self.blas_threads = blas_threads

    def _branching(self) -> tuple[int, ...]:
        _number("n_experts", self.n_experts, low=1, integer=True)
        return (int(self.n_experts),)

    def fit(self, X, y, sample_weight=None) -> MixtureOfExpertsRegressor:
        """Fit on ``X`` ``(n_samples, n_features)`` and ``y`` ``(n_samples,)``, optionally weighted by
        ``sample_weight`` ``(n_samples,)`` (non-negative; an integer weight counts a sample that many
        times); returns ``self``."""
        with self._fit_or_keep():
            self._fit_regression(X, y, sample_weight)
            self._set_flat_gate_attributes()
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted mean ``(n_samples,)``: gate-weighted sum of the experts, or the argmax expert."""
        return self._predict_regression(X)

    def predict_experts(self, X) -> np.ndarray:
        """Each expert's prediction: ``(n_samples, n_experts)``."""
        return self.experts_.predict(self._check_X(X))
