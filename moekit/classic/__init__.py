"""Classic mixtures of experts on NumPy/SciPy/scikit-learn (no torch): EM, hierarchical MoE, any expert.

    from moekit.classic import MixtureOfExpertsRegressor
    moe = MixtureOfExpertsRegressor(n_experts=3, random_state=0).fit(X, y)
    moe.predict(X), moe.predict_gate(X), moe.bic(X, y)

See docs/classic.md for the guide.
"""

from .classifier import MixtureOfExpertsClassifier
from .experts import LinearGaussianExperts, LogisticExperts
from .hierarchical import HierarchicalMixtureOfExperts
from .regressor import MixtureOfExpertsRegressor
from .selection import ExpertSelection, select_n_experts
from .wrapped import EstimatorExperts

__all__ = [
    "EstimatorExperts",
    "ExpertSelection",
    "HierarchicalMixtureOfExperts",
    "LinearGaussianExperts",
    "LogisticExperts",
    "MixtureOfExpertsClassifier",
    "MixtureOfExpertsRegressor",
    "select_n_experts",
]
