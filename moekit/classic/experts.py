"""Built-in experts: K Gaussian linear regressions and K multinomial logistic regressions.

An expert *block* holds all K experts of a mixture and answers the EM's questions in bulk:

- ``m_step(X, y, R, alive)``: refit from responsibilities ``R`` ``(n, K)`` times the sample weights
  (row ``i`` sums to sample ``i``'s weight, 1 without weights); experts with
  ``alive[k] == False`` keep their parameters (the dead-expert policy, see ``base.py``);
- ``log_density(X, y, train)``: ``(n, K)`` log p_k(y_i | x_i); ``train=True`` promises that ``X`` is
  the matrix last passed to ``m_step``, so cached design matrices or predictions may be reused;
- ``log_prior()``: log of the prior on the expert parameters (ridge / L2), up to a constant, so
  that EM is monotone in ``log-likelihood + log_prior``;
- ``predict(X)`` ``(n, K)`` (regression) or ``predict_proba(X)`` ``(n, K, C)`` (classification);
- ``n_parameters()``: free parameters, for AIC/BIC.

Every M-step here is exact (or, for the logistic experts, never decreases the expected complete
log-likelihood), which is what the monotone-likelihood test relies on.
"""

from __future__ import annotations

import numpy as np

from .softmax import fit_softmax, log_softmax_predict

_LOG_2PI = float(np.log(2.0 * np.pi))


def mean_std(A: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations ``(p,)``, ``(p,)`` of ``A`` ``(n, p)``, each row weighted
    by ``weights`` ``(n,)`` (``None``: all alike), so an integer weight counts a row that many times."""
    if weights is None:
        return A.mean(axis=0), A.std(axis=0)
    mean = weights @ A / weights.sum()
    return mean, np.sqrt(weights @ (A - mean) ** 2 / weights.sum())


def _with_intercept(X: np.ndarray) -> np.ndarray:
    return np.hstack([X, np.ones((X.shape[0], 1))])


class LinearGaussianExperts:
    """K experts ``y ~ N(x @ coef_[k] + intercept_[k], sigma2_[k])``.

    The M-step solves all K weighted (ridge) least-squares problems at once: one matrix product
    builds the K Gram matrices ``(K, p+1, p+1)`` and one batched ``np.linalg.solve`` returns the
    coefficients. With ``ridge > 0`` the prior is the conjugate ``beta_k ~ N(0, sigma_k^2 / ridge)``
    (intercept unpenalised), under which the joint update of ``(beta_k, sigma_k^2)`` is exact.
    ``variance="shared"`` ties one noise variance across experts. Variances never drop below
    ``var_floor`` (absolute), which keeps the likelihood bounded.
    """

    kind = "regression"

    def __init__(self, n_experts: int, *, ridge: float, variance: str, var_floor: float):
        self.n_experts = n_experts
        self.ridge = ridge
        self.variance = variance
        self.var_floor = var_floor
        self._X1 = None

    def _design(self, X: np.ndarray, train: bool) -> np.ndarray:
        if train and self._X1 is not None:
            return self._X1
        X1 = _with_intercept(X - self.x_mean_)  # centring only improves conditioning
        if train:
            self._X1 = X1
        return X1

    def m_step(self, X: np.ndarray, y: np.ndarray, R: np.ndarray, alive: np.ndarray) -> None:
        n, K = R.shape
        if not hasattr(self, "B_"):  # first M-step: the initial responsibilities (rows sum to the weights)
            weights = R.sum(axis=1)
            self.x_mean_ = mean_std(X, weights)[0]
            self.B_ = np.zeros((K, X.shape[1] + 1))
            var_y = float(mean_std(y[:, None], weights)[1][0] ** 2)
            self.sigma2_ = np.full(K, max(var_y, self.var_floor))
        X1 = self._design(X, train=True)
        p1 = X1.shape[1]
        Xw = (X1[:, None, :] * R[:, :, None]).reshape(n, K * p1)  # rows: r_ik * x_i, all k side by side
        A = (Xw.T @ X1).reshape(K, p1, p1)  # K weighted Gram matrices
        b = (Xw.T @ y).reshape(K, p1)
        idx = np.arange(p1 - 1)
        A[:, idx, idx] += self.ridge
        # A relative jitter per diagonal entry keeps near-singular systems solvable without biasing
        # the fit: it scales with each feature's own variance, so changing units changes nothing.
        # An all-zero column (a constant feature) gets its share of the trace.
        diag = A[:, np.arange(p1), np.arange(p1)]
        mean_diag = np.trace(A, axis1=1, axis2=2)[:, None] / p1
        A[:, np.arange(p1), np.arange(p1)] += 1e-12 * np.where(diag > 0, diag, mean_diag) + 1e-300
        A[~alive] = np.eye(p1)  # dead experts are not refit; keep their systems harmless
        try:
            B = np.linalg.solve(A, b[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            B = np.stack([np.linalg.lstsq(A[k], b[k], rcond=None)[0] for k in range(K)])
        self.B_ = np.where(alive[:, None], B, self.B_)
        resid2 = (y[:, None] - X1 @ self.B_.T) ** 2
        rss = np.einsum("nk,nk->k", R, resid2)
        n_k = R.sum(axis=0)
        pen = self.ridge * np.sum(self.B_[:, :-1] ** 2, axis=1)
        n_pen = (p1 - 1) if self.ridge > 0 else 0
        if self.variance == "shared":
            s2 = np.full(K, (rss.sum() + pen.sum()) / (n_k.sum() + K * n_pen))
        else:
            s2 = (rss + pen) / np.maximum(n_k + n_pen, 1e-300)
        s2 = np.maximum(s2, self.var_floor)
        self.sigma2_ = s2 if self.variance == "shared" else np.where(alive, s2, self.sigma2_)

    def predict(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        return self._design(X, train) @ self.B_.T

    def log_density(self, X: np.ndarray, y: np.ndarray, train: bool = False) -> np.ndarray:
        r = y[:, None] - self.predict(X, train)
        return -0.5 * (_LOG_2PI + np.log(self.sigma2_)) - 0.5 * r * r / self.sigma2_

    def log_prior(self) -> float:
        if self.ridge <= 0:
            return 0.0
        p = self.B_.shape[1] - 1
        sq = np.sum(self.B_[:, :-1] ** 2, axis=1)
        return float(np.sum(-0.5 * p * np.log(self.sigma2_) - 0.5 * self.ridge * sq / self.sigma2_))

    def n_parameters(self) -> int:
        K, p1 = self.B_.shape
        return K * p1 + (1 if self.variance == "shared" else K)

    def release(self) -> None:
        """Drop the cached training design matrix (called at the end of ``fit``)."""
        self._X1 = None

    @property
    def coef_(self) -> np.ndarray:
        return self.B_[:, :-1]

    @property
    def intercept_(self) -> np.ndarray:
        return self.B_[:, -1] - self.B_[:, :-1] @ self.x_mean_


class LogisticExperts:
    """K multinomial logistic experts ``p_k(y = c | x) = softmax(z @ W[k])[c]`` with an L2 penalty.

    Features are standardised internally (the penalty ``alpha / 2 * ||W[k]||^2`` acts on
    standardised coefficients, intercept unpenalised). Each M-step runs the same Newton/IRLS solver
    as the gates, warm started, on targets ``R[:, k] * onehot(y)``.
    """

    kind = "classification"

    def __init__(self, n_experts: int, n_classes: int, *, alpha: float, solver: str, max_iter: int,
                 tol: float = 1e-7):
        self.n_experts = n_experts
        self.n_classes = n_classes
        self.alpha = alpha
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self._Z1 = None

    def _design(self, X: np.ndarray, train: bool) -> np.ndarray:
        if train and self._Z1 is not None:
            return self._Z1
        Z1 = _with_intercept((X - self.x_mean_) / self.x_scale_)
        if train:
            self._Z1 = Z1
        return Z1

    def m_step(self, X: np.ndarray, y: np.ndarray, R: np.ndarray, alive: np.ndarray) -> None:
        K, C = self.n_experts, self.n_classes
        if not hasattr(self, "W_"):  # first M-step: the initial responsibilities (rows sum to the weights)
            self.x_mean_, sd = mean_std(X, R.sum(axis=1))
            self.x_scale_ = np.where(sd > 0, sd, 1.0)
            self.W_ = np.zeros((K, X.shape[1] + 1, C))
        Z1 = self._design(X, train=True)
        onehot = np.zeros((X.shape[0], C))
        onehot[np.arange(X.shape[0]), y] = 1.0
        for k in np.flatnonzero(alive):
            T = R[:, k, None] * onehot
            self.W_[k] = fit_softmax(Z1, T, self.W_[k], alpha=self.alpha, solver=self.solver,
                                     max_iter=self.max_iter, tol=self.tol)

    def predict_log_proba(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        Z1 = self._design(X, train)
        return np.stack([log_softmax_predict(Z1, self.W_[k]) for k in range(self.n_experts)], axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def log_density(self, X: np.ndarray, y: np.ndarray, train: bool = False) -> np.ndarray:
        lp = self.predict_log_proba(X, train)  # (n, K, C)
        return lp[np.arange(len(y)), :, y]

    def log_prior(self) -> float:
        return float(-0.5 * self.alpha * np.sum(self.W_[:, :-1] ** 2))

    def n_parameters(self) -> int:
        K, d1, C = self.W_.shape
        return K * d1 * (C - 1)

    def release(self) -> None:
        self._Z1 = None
