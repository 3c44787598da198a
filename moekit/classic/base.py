"""The EM engine shared by every classic mixture-of-experts estimator (flat or hierarchical).

The skeleton follows scikit-learn's ``BaseMixture``: ``n_init`` restarts from ``random_state``, each
one initialised (responsibilities from k-means on ``[X, y]``, on ``X`` for classifiers, or at
random; then an M-step) and run
E-step / M-step until the penalised log-likelihood gains less than ``tol`` per sample or
``max_iter`` is reached; the restart with the best objective wins, ``ConvergenceWarning`` if it did
not converge, and a final E-step on the returned parameters sets ``log_likelihood_``.

One iteration (Jordan & Jacobs 1994):
  E-step: expert log-densities ``(n, L)`` and gate log-probabilities; the upward pass gives node
    likelihoods and the log-likelihood, the downward pass gives every node's posterior;
  M-step: each expert is refit with weights = its leaf posterior; each gate is refit to its
    children's posteriors (targets that sum to the gate's own posterior, which thus weights it).

Sample weights (``fit(X, y, sample_weight)``) multiply every posterior before the M-step and every
sample's log-likelihood in the objective: an integer weight counts a sample that many times. The
k-means initialisation weights its samples too.

Objective: log-likelihood + log-prior of the penalties (gate L2, expert ridge / L2). Every M-step
never lowers it, so it never decreases across iterations (``objective_history_``).

Dead-expert policy: an expert whose total responsibility ``sum_i R[i, k]`` falls below
``1e-6 * n_samples`` is *frozen*: it keeps its last parameters and is not refit (a fit on weights
that are all ~0 is ill-posed), while its gate probability keeps shrinking. It revives if its
responsibility grows back. Experts still frozen at the end are flagged in ``dead_experts_`` and a
``UserWarning`` suggests fewer experts. Array shapes never change.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_consistent_length, check_is_fitted, validate_data
from threadpoolctl import ThreadpoolController

from ._logsumexp import logsumexp
from .experts import mean_std
from .softmax import fit_softmax
from .tree import aggregate, downward, level_sizes, path_log_prob, upward

_DEAD_FRACTION = 1e-6
_KMEANS_SAMPLES = 10_000


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()  # discovering the loaded libraries is slow: do it once


def _kmeans_labels(D: np.ndarray, k: int, rng, weights: np.ndarray | None = None) -> np.ndarray:
    """k-means labels of the rows of ``D`` (fitted on at most ``_KMEANS_SAMPLES`` of them, weighted by
    ``weights`` ``(n,)`` or all alike).

    A sub-sample is plenty for a starting partition; one OpenMP thread avoids the spin-wait slowdown
    of KMeans on busy machines (the init is a small part of a fit).
    """
    n = D.shape[0]
    if n < k:  # too few rows below this node: spread them over the children
        return np.arange(n) % k
    sub = np.arange(n) if n <= _KMEANS_SAMPLES else rng.choice(n, _KMEANS_SAMPLES, replace=False)
    if weights is not None and not weights[sub].any():
        return np.arange(n) % k  # no weight in this node's sample: nothing to cluster on
    with warnings.catch_warnings(), _threadpools().limit(limits=1, user_api="openmp"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters
        km = KMeans(n_clusters=k, n_init=1, random_state=rng.randint(2**31 - 1))
        km.fit(D[sub], sample_weight=None if weights is None else weights[sub])
        return km.predict(D)


def _sample_weight(sample_weight, n: int) -> np.ndarray | None:
    """Validated ``sample_weight``: ``None`` (all samples alike) or a float64 copy ``(n,)``, finite,
    non-negative, with a positive sum; a scalar weights every sample alike."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim == 0:
        w = np.full(n, float(w))
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},) (one weight per sample), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("sample_weight must be finite and non-negative")
    if not w.sum() > 0:
        raise ValueError("sample_weight is zero for every sample: at least one needs a positive weight")
    return w


def _weighted_total(values: np.ndarray, weights: np.ndarray | None) -> float:
    """``sum_i weights[i] * values[i]`` over the ``n`` samples of ``values`` (``(n,)`` or ``(n, 1)``);
    a plain sum without weights."""
    return float(values.sum() if weights is None else weights @ values.reshape(len(weights)))


def _choice(name: str, value, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _number(name: str, value, *, low: float, integer: bool = False, strict: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not np.isfinite(value) or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")


class _BaseMixtureOfExperts(BaseEstimator):
    """Engine; subclasses supply ``_branching()``, ``_kind()`` and the estimator-specific API."""

    # ---- parameters ---------------------------------------------------------------------------
    def _validate_common(self) -> None:
        _choice("gate", self.gate, ("softmax", "constant"))
        _choice("gate_solver", self.gate_solver, ("newton", "lbfgs"))
        _choice("init", self.init, ("kmeans", "random"))
        _choice("combine", self.combine, ("mean", "argmax"))
        _number("gate_alpha", self.gate_alpha, low=0.0)
        _number("gate_max_iter", self.gate_max_iter, low=1, integer=True)
        _number("n_init", self.n_init, low=1, integer=True)
        _number("max_iter", self.max_iter, low=1, integer=True)
        _number("tol", self.tol, low=0.0)
        if not isinstance(self.warm_start, (bool, np.bool_)):
            raise TypeError(f"warm_start must be True or False, got {self.warm_start!r}")
        if self.blas_threads is not None:
            _number("blas_threads", self.blas_threads, low=1, integer=True)

    def _gate_columns(self, n_features: int) -> np.ndarray:
        gf = self.gate_features
        if gf is None:
            return np.arange(n_features)
        arr = np.asarray(gf)
        if arr.size == 0:
            raise ValueError("gate_features selects no column; use gate='constant' for a gate "
                             "without features")
        if arr.dtype == bool:
            if arr.shape != (n_features,):
                raise ValueError(f"gate_features as a boolean mask must have length n_features={n_features}, "
                                 f"got shape {arr.shape}")
            arr = np.flatnonzero(arr)
        elif arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("gate_features must be None, a list of column indices or a boolean mask; "
                             f"got {gf!r}")
        if arr.min() < -n_features or arr.max() >= n_features:
            raise ValueError(f"gate_features indices must lie in [-{n_features}, {n_features}), got {gf!r}")
        return np.unique(arr % n_features)

    # ---- gate design and gate outputs --------------------------------------------------------
    def _gate_design(self, X: np.ndarray) -> np.ndarray:
        n = X.shape[0]
        if self._fit_gate == "constant":
            return np.ones((n, 1))
        Z = (X[:, self.gate_columns_] - self._gate_mean) / self._gate_scale
        return np.hstack([Z, np.ones((n, 1))])

    @staticmethod
    def _log_gates(gates: list[np.ndarray], Z1: np.ndarray) -> list[np.ndarray]:
        out = []
        for W in gates:  # W: (m, d1, b)
            logits = np.einsum("nd,mdb->nmb", Z1, W)
            out.append(logits - logsumexp(logits, axis=2, keepdims=True))
        return out

    # ---- one EM run ---------------------------------------------------------------------------
    def _initial_resp(self, X: np.ndarray, y: np.ndarray, n_leaves: int, rng,
                      weights: np.ndarray | None = None) -> np.ndarray:
        n = X.shape[0]
        if self.init == "random":
            R = rng.uniform(size=(n, n_leaves))
            return R / R.sum(axis=1, keepdims=True)
        # Regression clusters [X, y] (lines apart in y start apart); classification clusters X alone,
        # since clusters split by label would hand each expert a single class and stall EM at once.
        D = np.hstack([X, y[:, None]]) if self._kind() == "regression" else X
        sd = D.std(axis=0)
        D = (D - D.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        labels = np.zeros(n, dtype=np.intp)
        for b in self._branching():  # divisive k-means: siblings in the tree start as neighbours
            new = np.empty_like(labels)
            for node in np.unique(labels):
                rows = np.flatnonzero(labels == node)
                new[rows] = node * b + _kmeans_labels(D[rows], b, rng,
                                                      None if weights is None else weights[rows])
            labels = new
        R = np.zeros((n, n_leaves))
        R[np.arange(n), labels] = 1.0
        return R

    def _m_step(self, block, gates, X, y, Z1, posts: list[np.ndarray], mass: float,
                log_gates=None) -> np.ndarray:
        """Refit experts and gates to ``posts`` (every level's posteriors times the sample weights,
        whose total is ``mass``); returns the experts still alive."""
        n = X.shape[0]
        R = posts[-1]
        alive = R.sum(axis=0) >= _DEAD_FRACTION * mass
        block.m_step(X, y, R, alive)
        for l, W in enumerate(gates):
            m, _, b = W.shape
            if b == 1:
                continue
            T_all = posts[l + 1].reshape(n, m, b)
            for j in range(m):
                W[j] = fit_softmax(Z1, T_all[:, j, :], W[j], alpha=self.gate_alpha, solver=self.gate_solver,
                                   max_iter=self.gate_max_iter, tol=self._inner_tol(),
                                   log_p0=None if log_gates is None else log_gates[l][:, j, :])
        return alive

    def _inner_tol(self) -> float:
        """Tolerance of the gate / logistic solvers per unit of target mass: the EM tol (gains below it
        are invisible to the EM stopping test)."""
        return max(self.tol, 1e-10)

    def _objective(self, block, gates, ll: float) -> float:
        gate_prior = sum(float(np.sum(W[:, :-1, :] ** 2)) for W in gates)
        return ll + block.log_prior() - 0.5 * self.gate_alpha * gate_prior

    def _run_em(self, X, y, Z1, rng, var_floor, weights: np.ndarray | None = None, warm: dict | None = None):
        """One EM run from a fresh start, or (``warm``: the previous fit's attributes) from the
        previous fit's experts and gates."""
        branching = self._branching()
        sizes = level_sizes(branching)
        block = self._make_block(sizes[-1], var_floor, rng)
        hard = block.unweighted() if hasattr(block, "unweighted") else []
        if hard and weights is not None and np.ptp(weights) > 0:
            raise ValueError(f"sample_weight needs experts whose fit accepts sample_weight; "
                             f"{', '.join(hard)} does not (trained on the samples it wins, unweighted)")
        w = None if weights is None else weights[:, None]
        mass = float(X.shape[0] if weights is None else weights.sum())
        if warm is not None:
            # The fitted state (names ending in _: parameters, an estimator block's seeded
            # templates) into a block of today's settings.
            fitted = {k: v for k, v in vars(warm["experts_"]).items() if k.endswith("_")}
            vars(block).update(copy.deepcopy(fitted))
            gates = [W.copy() for W in warm["gates_"]]
            alive = ~warm["dead_experts_"]
        else:
            gates = [np.zeros((sizes[l], Z1.shape[1], b)) for l, b in enumerate(branching)]
            R0 = self._initial_resp(X, y, sizes[-1], rng, weights)
            alive = self._m_step(block, gates, X, y, Z1, aggregate(R0 if w is None else R0 * w, branching),
                                 mass)
        history, ll_history, converged, n_iter = [], [], False, 0
        for n_iter in range(1, self.max_iter + 1):
            log_gates = self._log_gates(gates, Z1)
            log_lik = upward(log_gates, block.log_density(X, y, train=True))
            ll = _weighted_total(log_lik[0], weights)
            history.append(self._objective(block, gates, ll))
            ll_history.append(ll)
            if n_iter > 1 and abs(history[-1] - history[-2]) < self.tol * mass:
                converged = True
                break
            posts = [np.exp(lp) if w is None else np.exp(lp) * w for lp in downward(log_gates, log_lik)]
            alive = self._m_step(block, gates, X, y, Z1, posts, mass, log_gates)
        if not converged:  # final E-step: the returned parameters get their own log-likelihood
            log_lik = upward(self._log_gates(gates, Z1), block.log_density(X, y, train=True))
            ll = _weighted_total(log_lik[0], weights)
            history.append(self._objective(block, gates, ll))
            ll_history.append(ll)
        block.release()
        return dict(block=block, gates=gates, converged=converged, n_iter=n_iter, ll=ll,
                    history=history, ll_history=ll_history, alive=alive)

    # ---- fit ----------------------------------------------------------------------------------
    def _fit_em(self, X: np.ndarray, y: np.ndarray, sample_weight=None):
        """Fit on validated ``X`` ``(n, p)`` float and ``y`` ``(n,)`` (float, or class codes), with
        ``sample_weight`` ``(n,)`` or ``None``."""
        self._validate_common()
        n, p = X.shape
        weights = _sample_weight(sample_weight, n)
        n_leaves = level_sizes(self._branching())[-1]
        if n < n_leaves:
            raise ValueError(f"fewer samples than experts: n_samples={n} < number of experts={n_leaves}")
        warm = self._warm_state(p)
        self.gate_columns_ = self._gate_columns(p)
        if warm is not None:  # the gates are in the previous fit's standardised units
            self._gate_mean, self._gate_scale = warm["_gate_mean"], warm["_gate_scale"]
        else:
            self._gate_mean, sd = mean_std(X[:, self.gate_columns_], weights)
            self._gate_scale = np.where(sd > 0, sd, 1.0)
        self._fit_gate = self.gate  # predictions follow the fitted gate, whatever set_params does after
        self._fit_experts = self.experts  # (for warm_start: the experts it may continue)
        Z1 = self._gate_design(X)
        var_floor = 0.0
        if self._kind() == "regression":
            vy = float(mean_std(y[:, None], weights)[1][0] ** 2)
            var_floor = self.variance_floor * (vy if vy > 0 else 1.0)
        rng = check_random_state(self.random_state)
        best = None
        with self._blas_threads():
            for _ in range(1 if warm is not None else self.n_init):
                run = self._run_em(X, y, Z1, check_random_state(rng.randint(2**31 - 1)), var_floor, weights,
                                   warm)
                if best is None or run["history"][-1] > best["history"][-1]:
                    best = run
        if not best["converged"]:
            warnings.warn(f"EM did not converge in max_iter={self.max_iter} iterations (tol={self.tol}); "
                          "raise max_iter or tol, or try more n_init.", ConvergenceWarning, stacklevel=4)
        self.experts_ = best["block"]
        self.gates_ = best["gates"]
        self.converged_ = best["converged"]
        self.n_iter_ = best["n_iter"]
        self.log_likelihood_ = best["ll"]
        self.objective_history_ = np.asarray(best["history"])
        self.log_likelihood_history_ = np.asarray(best["ll_history"])
        self.dead_experts_ = ~best["alive"]
        if self.dead_experts_.any():
            warnings.warn(f"experts {np.flatnonzero(self.dead_experts_).tolist()} lost (almost) all "
                          "responsibility and were frozen; consider fewer experts.", UserWarning,
                          stacklevel=4)
        self.n_parameters_ = self._count_parameters()
        return self

    def _gate_in_original_units(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gate ``W`` ``(d1, b)`` on standardised features -> coef ``(p_gate, b)``, intercept ``(b,)``."""
        if self._fit_gate == "constant":
            return np.zeros((len(self.gate_columns_), W.shape[1])), W[-1].copy()
        return W[:-1] / self._gate_scale[:, None], W[-1] - (self._gate_mean / self._gate_scale) @ W[:-1]

    def _set_flat_gate_attributes(self) -> None:
        self.gate_coef_, self.gate_intercept_ = self._gate_in_original_units(self.gates_[0][0])

    @contextlib.contextmanager
    def _fit_or_keep(self):
        """Run a fit; if it raises (bad input, Ctrl-C), the estimator is left as it was before the call,
        so a model fitted earlier stays usable. The state before the call is the one ``warm_start``
        continues from."""
        saved = dict(self.__dict__)
        self._before_fit = saved
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        finally:
            self.__dict__.pop("_before_fit", None)

    def _warm_state(self, n_features: int) -> dict | None:
        """With ``warm_start`` and an earlier fit: that fit's attributes, after checking that it can
        be continued on this data and these settings (else ``ValueError``); otherwise ``None``."""
        before = getattr(self, "_before_fit", {})
        if not self.warm_start or "experts_" not in before:
            return None
        changed = []
        if before["n_features_in_"] != n_features:
            changed.append(f"n_features {before['n_features_in_']} -> {n_features}")
        branching = self._branching()
        tree = [(size, b) for size, b in zip(level_sizes(branching), branching)]
        if [(W.shape[0], W.shape[2]) for W in before["gates_"]] != tree:
            changed.append("the number of experts or the tree")
        if not np.array_equal(before["gate_columns_"], self._gate_columns(n_features)):
            changed.append("gate_features")
        if before["_fit_gate"] != self.gate:
            changed.append("gate")
        if before.get("_fit_task", self._kind()) not in (None, self._kind()):
            changed.append("task")
        experts = before.get("_fit_experts", self.experts)  # (absent in a model fitted before warm_start)
        if experts is not self.experts and experts != self.experts:
            changed.append("experts")
        if "classes_" in before and self._kind() == "classification" and not np.array_equal(
                before["classes_"], self.classes_):
            changed.append("the classes of y")
        if changed:
            raise ValueError(f"warm_start=True cannot continue the previous fit: {', '.join(changed)} "
                             "changed; set warm_start=False to fit from a fresh start")
        return before

    def _blas_threads(self):
        """``blas_threads`` BLAS threads (default 1) for EM with the built-in experts.

        Its products are tall and skinny (n x tens of columns): BLAS threads gain little there, and
        on a busy machine they spin-wait for cores (measured 7x slower on the shared 2-core box, see
        docs/benchmarks.md). ``blas_threads=None``, or user estimators as experts, leave the thread
        settings alone.
        """
        if isinstance(self._experts_spec(), str) and self.blas_threads is not None:
            return _threadpools().limit(limits=int(self.blas_threads), user_api="blas")
        return contextlib.nullcontext()

    def _count_parameters(self) -> int | None:
        experts = self.experts_.n_parameters()
        if experts is None:
            return None
        gates = sum(W.shape[0] * W.shape[1] * (W.shape[2] - 1) for W in self.gates_)
        return int(experts + gates)

    # ---- outputs ------------------------------------------------------------------------------
    def _log_path(self, X: np.ndarray) -> np.ndarray:
        return path_log_prob(self._log_gates(self.gates_, self._gate_design(X)))

    def _log_lik_parts(self, X: np.ndarray, y: np.ndarray):
        log_gates = self._log_gates(self.gates_, self._gate_design(X))
        return log_gates, upward(log_gates, self.experts_.log_density(X, y))

    def _ic(self, X, y, penalty_per_param: float, weights: np.ndarray | None) -> float:
        if self.n_parameters_ is None:
            raise ValueError("aic/bic need a parameter count, which is undefined for these experts "
                             f"({type(self.experts_.estimators_[0]).__name__}); use experts with coef_ or "
                             "tree_ (linear models, trees) or the built-in experts")
        ll = _weighted_total(self._log_likelihood_samples(X, y), weights)
        return -2.0 * ll + penalty_per_param * self.n_parameters_

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float64)

    def _check_Xy(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X, y = self._check_X(X), self._encode_y(y)
        check_consistent_length(X, y)
        return X, y

    def predict_gate(self, X) -> np.ndarray:
        """Gate probability of reaching each expert: ``(n_samples, n_experts)``, rows sum to 1.

        For a hierarchical model this is the product of the gate outputs along each root-to-leaf path.
        """
        return np.exp(self._log_path(self._check_X(X)))

    def log_likelihood_samples(self, X, y) -> np.ndarray:
        """Log-likelihood ``log p(y_i | x_i)`` of each sample under the mixture: ``(n_samples,)``."""
        return self._log_likelihood_samples(*self._check_Xy(X, y))

    def _log_likelihood_samples(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._log_lik_parts(X, y)[1][0][:, 0]

    def predict_responsibilities(self, X, y) -> np.ndarray:
        """Posterior probability that each expert generated ``(x_i, y_i)``: ``(n_samples, n_experts)``."""
        X, y = self._check_Xy(X, y)
        log_gates, log_lik = self._log_lik_parts(X, y)
        return np.exp(downward(log_gates, log_lik)[-1])

    def aic(self, X, y, sample_weight=None) -> float:
        """Akaike information criterion ``-2 log L + 2 n_parameters_`` on ``(X, y)`` (lower is better);
        with ``sample_weight`` ``log L`` is the weighted sum of the samples' log-likelihoods."""
        X, y = self._check_Xy(X, y)
        return self._ic(X, y, 2.0, _sample_weight(sample_weight, X.shape[0]))

    def bic(self, X, y, sample_weight=None) -> float:
        """Bayesian information criterion ``-2 log L + log(n) n_parameters_`` (lower is better); with
        ``sample_weight``, ``log L`` is weighted and ``n`` is the total weight (as for repeated rows)."""
        X, y = self._check_Xy(X, y)
        weights = _sample_weight(sample_weight, X.shape[0])
        n = X.shape[0] if weights is None else weights.sum()
        return self._ic(X, y, float(np.log(n)), weights)
