"""scikit-learn's own estimator checks, and moekit.classic's independence from torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import unittest
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeRegressor
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit.classic import HierarchicalMixtureOfExperts, MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

# Small EM budgets keep the ~50 checks per estimator fast; the defaults are exercised elsewhere.
FAST = dict(max_iter=10, random_state=0)
ESTIMATORS = [
    MixtureOfExpertsRegressor(**FAST),
    MixtureOfExpertsClassifier(**FAST),
    HierarchicalMixtureOfExperts(branching=(2, 2), **FAST),
    HierarchicalMixtureOfExperts(branching=(2, 2), task="classification", **FAST),
    # scikit-learn experts: hard EM with a kNN (fewer samples than neighbours), soft EM with seeded trees
    MixtureOfExpertsClassifier(3, experts=KNeighborsClassifier(), **FAST),
    MixtureOfExpertsRegressor(2, experts=DecisionTreeRegressor(max_depth=3), **FAST),
]


# Left out, as not applicable: array-API inputs (NumPy only, by design) and pandas column-name checks
# (pandas is not a dependency); both would only be reported as skipped.
NOT_APPLICABLE = {"check_array_api_input", "check_dataframe_column_names_consistency"}
_checks = parametrize_with_checks(ESTIMATORS)
_params = [p for p in _checks.args[1] if getattr(p[1], "func", p[1]).__name__ not in NOT_APPLICABLE]

# Checks that fail by design; each must keep failing (a pass means the entry is stale).
# - Weights vs repeated rows: the check shuffles the weighted rows and stops EM after 10 iterations,
#   and EM's k-means start depends on the row order, so the two fits start apart on its 15 samples
#   of 30 features. test_sample_weight.py checks the equivalence from one start.
# - A kNN expert (hard EM) cannot weight samples, so the mixture refuses unequal weights.
EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data": lambda est: True,
    "check_sample_weights_not_overwritten": lambda est: "KNeighbors" in repr(est),
    "check_classifiers_one_label_sample_weights": lambda est: "KNeighbors" in repr(est),
}


@pytest.mark.parametrize(_checks.args[0], _params, **_checks.kwargs)
def test_sklearn_estimator_checks(estimator, check):
    name = getattr(check, "func", check).__name__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # dead-expert notices on the checks' tiny data sets
        if EXPECTED_FAILURES.get(name, lambda est: False)(estimator):
            with pytest.raises((AssertionError, ValueError)):
                check(estimator)
            return
        try:
            check(estimator)
        except unittest.SkipTest as skip:
            # *_data_not_an_array runs its NotAnArray case first, then skips the pandas case
            if "pandas is not installed" not in str(skip):
                raise


CLASSIC = pathlib.Path(__file__).resolve().parents[2] / "moekit" / "classic"


@pytest.mark.parametrize("path", sorted(CLASSIC.glob("*.py")), ids=lambda p: p.name)
def test_classic_modules_import_no_torch_nor_other_moekit_parts(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in {"torch", "moekit", "transformers"}, (path.name, name)


def test_classic_package_works_with_torch_blocked():
    # Load moekit.classic under a bare parent package, with `import torch` made to fail.
    code = f"""
import sys, types
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
pkg = types.ModuleType("moekit"); pkg.__path__ = [{str(CLASSIC.parent)!r}]
sys.modules["moekit"] = pkg
import numpy as np
from moekit.classic import MixtureOfExpertsRegressor
X = np.linspace(-1, 1, 40)[:, None]
MixtureOfExpertsRegressor(2, max_iter=5, random_state=0).fit(X, X[:, 0])
assert "torch" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("make", [
    lambda: MixtureOfExpertsRegressor(2, **FAST), lambda: MixtureOfExpertsClassifier(2, **FAST),
    lambda: HierarchicalMixtureOfExperts(branching=(2,), **FAST),
])
def test_y_of_another_length_than_X_is_refused(make):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    y = (X[:, 0] > 0).astype(int)
    model = make().fit(X, y)
    for method in (model.log_likelihood_samples, model.predict_responsibilities, model.aic, model.bic):
        with pytest.raises(ValueError, match="inconsistent numbers of samples"):
            method(X, y[:1])  # one value was broadcast over every row


def test_predictions_follow_the_fit_not_parameters_set_after_it():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = np.where(X[:, 0] > 0, 3 * X[:, 1], -2 * X[:, 1])
    model = MixtureOfExpertsRegressor(2, **FAST).fit(X, y)
    before = model.predict(X)
    model.set_params(gate="constant")
    np.testing.assert_array_equal(model.predict(X), before)
    assert not model.fit(X, y).gate_coef_.any()  # a refit takes the new gate
    hme = HierarchicalMixtureOfExperts(branching=(2,), **FAST).fit(X, y)
    before = hme.predict(X)
    hme.set_params(task="classification")
    np.testing.assert_array_equal(hme.predict(X), before)
    assert not hasattr(hme, "predict_proba")


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_hierarchical_fit_without_y_says_y_is_required(task):
    with pytest.raises(ValueError, match="requires y"):
        HierarchicalMixtureOfExperts(branching=(2,), task=task, **FAST).fit(np.zeros((10, 2)), None)
