"""scikit-learn's own estimator checks, and moekit.classic's independence from torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import unittest
import warnings

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


@pytest.mark.parametrize(_checks.args[0], _params, **_checks.kwargs)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # dead-expert notices on the checks' tiny data sets
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
