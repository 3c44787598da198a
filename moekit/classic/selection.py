"""Choosing the number of experts by BIC (or AIC) over a range, each candidate fitted with restarts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone


@dataclass(frozen=True)
class ExpertSelection:
    """Result of :func:`select_n_experts`.

    ``criterion[k]`` is the information criterion of the model with ``k`` experts (lower is better),
    ``best_estimator`` the fitted winner and ``estimators[k]`` every fitted candidate.
    """

    best_n_experts: int
    best_estimator: object
    criterion: dict[int, float]
    estimators: dict[int, object] = field(repr=False)


def select_n_experts(estimator, X, y, n_experts: Iterable[int] = range(1, 6), *, n_init: int | None = 3,
                     criterion: str = "bic", sample_weight=None) -> ExpertSelection:
    """Fit ``clone(estimator)`` for each number of experts in ``n_experts`` and keep the lowest BIC.

    ``estimator`` is a ``MixtureOfExpertsRegressor`` or ``MixtureOfExpertsClassifier`` (anything
    with an ``n_experts`` parameter and ``bic``/``aic`` methods); ``n_init`` overrides its restarts
    (``None`` keeps the estimator's own). The criterion is computed on ``(X, y)``; ``sample_weight``
    ``(n_samples,)`` weights both the fits and the criterion.
    """
    if criterion not in ("bic", "aic"):
        raise ValueError(f"criterion must be 'bic' or 'aic', got {criterion!r}")
    if "n_experts" not in estimator.get_params():
        raise TypeError(f"{type(estimator).__name__} has no n_experts parameter")
    ks = [int(k) for k in n_experts]
    if not ks or min(ks) < 1:
        raise ValueError(f"n_experts must be a non-empty range of integers >= 1, got {ks}")
    scores: dict[int, float] = {}
    fitted: dict[int, object] = {}
    for k in ks:
        est = clone(estimator).set_params(n_experts=k)
        if n_init is not None:
            est.set_params(n_init=n_init)
        est.fit(X, y, sample_weight=sample_weight)
        fitted[k] = est
        scores[k] = float(getattr(est, criterion)(X, y, sample_weight=sample_weight))
    best = min(ks, key=lambda k: (scores[k], k))
    if not np.isfinite(scores[best]):
        raise ValueError(f"every candidate has a non-finite {criterion}: {scores}")
    return ExpertSelection(best_n_experts=best, best_estimator=fitted[best], criterion=scores,
                           estimators=fitted)
