"""``MixtureOfExpertsClassifier``: a softmax-gated mixture of classification experts fitted by EM."""

from __future__ import annotations

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from .base import _BaseMixtureOfExperts, _number
from .wrapped import make_expert_block


class _ClassificationPart:
    """Classification-specific pieces, shared by the flat classifier and the hierarchical model."""

    def _kind(self) -> str:
        return "classification"

    def _experts_spec(self):
        return self.experts

    def _make_block(self, n_leaves: int, var_floor: float, rng):
        _number("expert_alpha", self.expert_alpha, low=0.0)
        return make_expert_block(self._experts_spec(), "classification", n_leaves,
                                 n_classes=len(self.classes_), variance="per_expert", var_floor=0.0,
                                 ridge=0.0, expert_alpha=self.expert_alpha, solver=self.gate_solver,
                                 max_iter=self.gate_max_iter, tol=self._inner_tol(), rng=rng)

    def _fit_classification(self, X, y, sample_weight=None):
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has only one class ({self.classes_[0]}); a classifier needs at "
                             "least 2 classes")
        self.n_classes_ = len(self.classes_)
        return self._fit_em(X, codes.astype(np.intp), sample_weight)

    def _encode_y(self, y) -> np.ndarray:
        y = column_or_1d(np.asarray(y), warn=True)
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        unknown = self.classes_[idx] != y
        if np.any(unknown):
            raise ValueError(f"y contains labels not seen in fit: {np.unique(y[unknown])[:5].tolist()}")
        return idx.astype(np.intp)

    def _predict_proba_classification(self, X) -> np.ndarray:
        X = self._check_X(X)
        P = self.experts_.predict_proba(X)  # (n, K, C)
        gate = np.exp(self._log_path(X))
        if self.combine == "argmax":
            return P[np.arange(X.shape[0]), gate.argmax(axis=1)]
        return np.einsum("nk,nkc->nc", gate, P)


class MixtureOfExpertsClassifier(_ClassificationPart, ClassifierMixin, _BaseMixtureOfExperts):
    """Mixture of classification experts with a softmax gate, fitted by EM.

    ``p(y | x) = sum_k g_k(x) p_k(y | x)``; ``predict_proba`` returns that mixture (or, with
    ``combine="argmax"``, the most probable expert's probabilities) ``(n_samples, n_classes)``.

    Parameters are those of ``MixtureOfExpertsRegressor`` except: ``experts`` is ``"logistic"``
    (built-in multinomial logistic experts, L2 penalty ``expert_alpha`` on standardised features), one
    classifier with ``predict_proba`` (cloned K times) or a list of K; there is no noise variance.

    Attributes
    ----------
    classes_ ``(n_classes,)``; experts_ (for ``"logistic"``: ``W_`` ``(K, n_features + 1, n_classes)``
    on standardised features, intercept last; otherwise ``estimators_``); gate_coef_, gate_intercept_,
    converged_, n_iter_, log_likelihood_, objective_history_, log_likelihood_history_, n_parameters_,
    dead_experts_, n_features_in_.
    """

    def __init__(self, n_experts: int = 2, *, experts="logistic", gate: str = "softmax", gate_features=None,
                 gate_alpha: float = 0.01, gate_solver: str = "newton", gate_max_iter: int = 3,
                 expert_alpha: float = 0.01, combine: str = "mean", init: str = "kmeans", n_init: int = 1,
                 max_iter: int = 200, tol: float = 1e-5, random_state=None, warm_start: bool = False,
                 blas_threads: int | None = 1):
        self.n_experts = n_experts
        self.experts = experts
        self.gate = gate
        self.gate_features = gate_features
        self.gate_alpha = gate_alpha
        self.gate_solver = gate_solver
        self.gate_max_iter = gate_max_iter
        self.expert_alpha = expert_alpha
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

    def fit(self, X, y, sample_weight=None) -> MixtureOfExpertsClassifier:
        """Fit on ``X`` ``(n_samples, n_features)`` and labels ``y`` ``(n_samples,)``, optionally
        weighted by ``sample_weight`` ``(n_samples,)`` (as for the regressor); returns ``self``."""
        with self._fit_or_keep():
            self._fit_classification(X, y, sample_weight)
            self._set_flat_gate_attributes()
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` in the order of ``classes_``."""
        return self._predict_proba_classification(X)

    def predict_log_proba(self, X) -> np.ndarray:
        """``log(predict_proba(X))``: ``(n_samples, n_classes)``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """Most probable class ``(n_samples,)``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]
