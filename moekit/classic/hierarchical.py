"""``HierarchicalMixtureOfExperts``: a tree of softmax gates over experts (Jordan & Jacobs 1994)."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils import ClassifierTags, RegressorTags
from sklearn.utils.metaestimators import available_if

from .base import _BaseMixtureOfExperts, _choice
from .classifier import _ClassificationPart
from .regressor import _RegressionPart
from .tree import level_sizes

_TASKS = ("regression", "classification")


def _is_classification(est) -> bool:
    return est._task() == "classification"


class HierarchicalMixtureOfExperts(_ClassificationPart, _RegressionPart, _BaseMixtureOfExperts):
    """Hierarchical mixture of experts for regression or classification, fitted by EM.

    The gating tree is ``branching = (b_1, ..., b_D)``: a root gate over ``b_1`` children, each of
    which gates over ``b_2`` children, and so on, down to ``prod(branching)`` experts at the leaves,
    numbered left to right. ``p(y | x) = sum_leaves (product of gate outputs on the path) p_leaf(y | x)``.
    The E-step runs an upward pass (node likelihoods) and a downward pass (node posteriors); each
    gate is refit to its children's posteriors, which sum to (and so are weighted by) its own.

    Parameters
    ----------
    branching : tuple of ints >= 2 (any depth); ``(K,)`` is a flat mixture of K experts.
    task : ``"regression"`` or ``"classification"``; it decides the estimator type, ``predict``,
        ``predict_proba`` (classification only) and ``score`` (R^2 or accuracy).
    experts : ``"auto"`` (built-in Gaussian linear experts for regression, multinomial logistic ones
        for classification), one estimator (cloned per leaf) or a list of ``prod(branching)``.
    Other parameters: as ``MixtureOfExpertsRegressor`` (``variance``, ``ridge``, ``variance_floor``
    apply to regression) and ``MixtureOfExpertsClassifier`` (``expert_alpha`` to classification).

    Attributes
    ----------
    gates_ : list over levels of arrays ``(m_l, n_gate_features + 1, b_{l+1})`` on standardised gate
        features (intercept last); gate_coefs_ / gate_intercepts_ : the same in original units,
        ``(m_l, n_gate_features, b_{l+1})`` and ``(m_l, b_{l+1})``. classes_ (classification), and
        the EM attributes of the flat estimators.
    """

    def __init__(self, branching=(2, 2), *, task: str = "regression", experts="auto", gate: str = "softmax",
                 gate_features=None, gate_alpha: float = 0.01, gate_solver: str = "newton",
                 gate_max_iter: int = 3, variance: str = "per_expert", ridge: float = 0.0,
                 variance_floor: float = 1e-6, expert_alpha: float = 0.01, combine: str = "mean",
                 init: str = "kmeans", n_init: int = 1, max_iter: int = 200, tol: float = 1e-5,
                 random_state=None, warm_start: bool = False,
                 blas_threads: int | None = 1):
        self.branching = branching
        self.task = task
        self.experts = experts
        self.gate = gate
        self.gate_features = gate_features
        self.gate_alpha = gate_alpha
        self.gate_solver = gate_solver
        self.gate_max_iter = gate_max_iter
        self.variance = variance
        self.ridge = ridge
        self.variance_floor = variance_floor
        self.expert_alpha = expert_alpha
        self.combine = combine
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.warm_start = warm_start
        self.blas_threads = blas_threads

    def __sklearn_tags__(self):
        tags = BaseEstimator.__sklearn_tags__(self)
        tags.target_tags.required = True  # as sklearn's regressor / classifier mixins: fit(X, None) says so
        if self.task == "classification":
            tags.estimator_type = "classifier"
            tags.classifier_tags = ClassifierTags()
        else:
            tags.estimator_type = "regressor"
            tags.regressor_tags = RegressorTags()
        return tags

    # ---- dispatch on task ---------------------------------------------------------------------
    def _task(self) -> str:
        """The task of the fit (``set_params(task=...)`` takes effect at the next fit), else ``task``."""
        return getattr(self, "_fit_task", None) or self.task

    def _kind(self) -> str:
        task = self._task()
        _choice("task", task, _TASKS)
        return task

    def _branching(self) -> tuple[int, ...]:
        br = self.branching
        if isinstance(br, numbers.Integral) and not isinstance(br, bool):
            br = (br,)
        ok = isinstance(br, (tuple, list)) and len(br) > 0 and all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 2 for b in br)
        if not ok:
            raise ValueError(f"branching must be a non-empty tuple of integers >= 2, got {self.branching!r}")
        return tuple(int(b) for b in br)

    def _experts_spec(self):
        if isinstance(self.experts, str) and self.experts == "auto":
            return "linear" if self.task == "regression" else "logistic"
        return self.experts

    def _make_block(self, n_leaves: int, var_floor: float, rng):
        part = _RegressionPart if self._kind() == "regression" else _ClassificationPart
        return part._make_block(self, n_leaves, var_floor, rng)

    def _encode_y(self, y) -> np.ndarray:
        part = _RegressionPart if self._kind() == "regression" else _ClassificationPart
        return part._encode_y(self, y)

    # ---- public API ---------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        """Number of experts (leaves): ``prod(branching)``."""
        return level_sizes(self._branching())[-1]

    def fit(self, X, y, sample_weight=None) -> HierarchicalMixtureOfExperts:
        """Fit on ``X`` ``(n_samples, n_features)`` and ``y`` ``(n_samples,)``, optionally weighted by
        ``sample_weight`` ``(n_samples,)`` (non-negative; an integer weight counts a sample that many
        times); returns ``self``."""
        with self._fit_or_keep():
            self._fit_task = None  # a refit follows the current task
            if self._kind() == "regression":
                self._fit_regression(X, y, sample_weight)
            else:
                self._fit_classification(X, y, sample_weight)
            self._fit_task = self.task
            units = [[self._gate_in_original_units(Wj) for Wj in W] for W in self.gates_]
            coefs, intercepts = zip(*[zip(*level) for level in units])
            self.gate_coefs_ = [np.stack(c) for c in coefs]
            self.gate_intercepts_ = [np.stack(i) for i in intercepts]
        return self

    def predict(self, X) -> np.ndarray:
        """Regression: predicted mean ``(n_samples,)``; classification: most probable class."""
        if self._kind() == "regression":
            return self._predict_regression(X)
        proba = self._predict_proba_classification(X)
        return self.classes_[proba.argmax(axis=1)]

    @available_if(_is_classification)
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` (classification only)."""
        return self._predict_proba_classification(X)

    @available_if(_is_classification)
    def predict_log_proba(self, X) -> np.ndarray:
        """``log(predict_proba(X))`` (classification only)."""
        with np.errstate(divide="ignore"):
            return np.log(self._predict_proba_classification(X))

    def predict_experts(self, X) -> np.ndarray:
        """Each expert's output: ``(n, n_experts)`` means, or ``(n, n_experts, n_classes)`` probabilities."""
        X = self._check_X(X)
        if self._kind() == "regression":
            return self.experts_.predict(X)
        return self.experts_.predict_proba(X)

    def score(self, X, y, sample_weight=None) -> float:
        """R^2 of ``predict`` (regression) or its accuracy (classification)."""
        metric = r2_score if self._kind() == "regression" else accuracy_score
        return float(metric(y, self.predict(X), sample_weight=sample_weight))
