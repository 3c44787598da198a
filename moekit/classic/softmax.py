"""Weighted multinomial logit with soft targets: the solver behind every gate and the logistic experts.

Shapes: ``n`` samples, ``d1`` features including the trailing intercept column, ``C`` outputs.

The problem solved is

    minimise  f(W) = -sum_i sum_c T[i, c] * log softmax(Z1 @ W)[i, c] + alpha / 2 * ||W[:-1]||^2

over ``W`` of shape ``(d1, C)``; ``T`` holds non-negative targets (responsibilities times sample
weights), so a row need not sum to one and ``w_i = sum_c T[i, c]`` acts as the sample weight. The
intercept row is not penalised. The parameterisation is the symmetric one (one column per output),
so with ``alpha > 0`` every class is treated alike; the direction that shifts all columns by the
same vector leaves ``f`` unchanged and the Newton system is regularised by a tiny multiple of the
identity to ignore it.

Every solver starts from the given ``W0`` and returns a ``W`` whose objective is never larger than
that of ``W0``: this is what keeps the EM log-likelihood monotone (a generalised EM step).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from ._logsumexp import logsumexp

_ARMIJO = 1e-4
_MAX_HALVINGS = 30
_HESSIAN_ROWS = 8_192


def softmax_objective(W: np.ndarray, Z1: np.ndarray, T: np.ndarray, alpha: float) -> float:
    """Penalised negative log-likelihood ``f(W)`` (see the module docstring); ``W`` is ``(d1, C)``."""
    return _evaluate(W, Z1, T, T.sum(axis=1), alpha)[0]


def _evaluate(W, Z1, T, w, alpha):
    """``f(W)`` plus the log-probabilities it was computed from (reused for the gradient)."""
    logits = Z1 @ W  # (n, C)
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    return float(-(T * log_p).sum() + 0.5 * alpha * np.sum(W[:-1] ** 2)), log_p


def _gradient(W, Z1, T, w, alpha, P):
    G = Z1.T @ (w[:, None] * P - T)  # (d1, C)
    G[:-1] += alpha * W[:-1]
    return G


def _hessian(Z1: np.ndarray, P: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Hessian in the column-major vectorisation ``vec(W) = W.T.ravel()``: ``(C*d1, C*d1)``.

    H = sum_i w_i (diag(p_i) - p_i p_i^T) kron z_i z_i^T, computed as one block-diagonal term and one
    rank-structured term, two matrix products in all. For large ``n`` it is estimated on an evenly
    strided subset of ``_HESSIAN_ROWS`` rows, scaled up (sub-sampled Newton): the gradient stays exact
    and the line search still guarantees descent, so only the speed of convergence can change.
    """
    n, d1 = Z1.shape
    C = P.shape[1]
    scale = 1.0
    if n > _HESSIAN_ROWS:
        rows = np.linspace(0, n - 1, _HESSIAN_ROWS).astype(np.intp)
        scale = w.sum() / max(w[rows].sum(), 1e-300)
        Z1, P, w = Z1[rows], P[rows], w[rows]
        n = _HESSIAN_ROWS
    sw = np.sqrt(w * scale)
    U = (Z1[:, None, :] * (sw[:, None] * P)[:, :, None]).reshape(n, C * d1)  # rows: sqrt(w) p_c z
    H = -(U.T @ U)
    diag_blocks = (U.T @ (sw[:, None] * Z1)).reshape(C, d1, d1)  # sum_i w p_c z z^T
    for c in range(C):
        sl = slice(c * d1, (c + 1) * d1)
        H[sl, sl] += diag_blocks[c]
        H[sl, sl][np.arange(d1 - 1), np.arange(d1 - 1)] += alpha
    return H


def _fit_newton(W, Z1, T, alpha, max_iter, tol, log_p0=None):
    d1, C = W.shape
    w = T.sum(axis=1)
    total = max(float(w.sum()), 1e-300)
    if log_p0 is None:
        f, log_p = _evaluate(W, Z1, T, w, alpha)
    else:  # the caller already has log softmax(Z1 @ W) (the E-step's gate outputs)
        log_p = log_p0
        f = float(-(T * log_p).sum() + 0.5 * alpha * np.sum(W[:-1] ** 2))
    for _ in range(max_iter):
        P = np.exp(log_p)
        G = _gradient(W, Z1, T, w, alpha, P)
        H = _hessian(Z1, P, w, alpha)
        g = G.T.ravel()
        jitter = 1e-10 * (np.trace(H) / H.shape[0] + 1e-12)
        try:
            step = np.linalg.solve(H + jitter * np.eye(H.shape[0]), g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(H, g, rcond=None)[0]
        slope = float(g @ step)  # twice the Newton decrement: the predicted decrease of f
        if not np.isfinite(slope) or slope <= 0:  # not a descent direction: fall back to the gradient
            step, slope = g / total, float(g @ g) / total
        if slope <= 2.0 * tol * total:
            break
        D = step.reshape(C, d1).T
        t, accepted = 1.0, False
        for _ in range(_MAX_HALVINGS):
            W_new = W - t * D
            f_new, log_p_new = _evaluate(W_new, Z1, T, w, alpha)
            if np.isfinite(f_new) and f_new <= f - _ARMIJO * t * slope:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        W, f, log_p = W_new, f_new, log_p_new
    return W


def _fit_lbfgs(W, Z1, T, alpha, max_iter, tol):
    d1, C = W.shape
    scale = max(float(T.sum()), 1.0)

    w = T.sum(axis=1)

    def fun(v):
        W = v.reshape(d1, C)
        f, log_p = _evaluate(W, Z1, T, w, alpha)
        return f / scale, _gradient(W, Z1, T, w, alpha, np.exp(log_p)).ravel() / scale

    res = minimize(fun, W.ravel(), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol})
    return res.x.reshape(d1, C)


def fit_softmax(
    Z1: np.ndarray,
    T: np.ndarray,
    W0: np.ndarray,
    *,
    alpha: float,
    solver: str = "newton",
    max_iter: int = 20,
    tol: float = 1e-7,
    log_p0: np.ndarray | None = None,
) -> np.ndarray:
    """Improve ``W0`` ``(d1, C)`` for soft targets ``T`` ``(n, C)`` on features ``Z1`` ``(n, d1)``.

    ``solver="newton"``: Newton-Raphson (IRLS; Hessian sub-sampled past 8k rows) with an Armijo
    backtracking line search, stopped once the predicted decrease per unit of target mass (the Newton
    decrement) is below ``tol``; ``solver="lbfgs"``: scipy's L-BFGS-B (``tol`` is its ``gtol``).
    The result never has a larger objective than ``W0``. ``log_p0``, if given, must equal
    ``log_softmax_predict(Z1, W0)`` and saves one evaluation.
    """
    C = T.shape[1]
    if C == 1:
        return W0
    if Z1.shape[1] == 1:  # constant gate: the intercept-only optimum is closed form
        tot = T.sum(axis=0)
        W = np.log(np.maximum(tot / max(tot.sum(), 1e-300), 1e-300))[None, :]
        return W - W.mean()
    if solver == "newton":  # every accepted step passed the Armijo test: f never increases
        W = _fit_newton(W0.copy(), Z1, T, alpha, max_iter, tol, log_p0)
    else:
        W = _fit_lbfgs(W0.copy(), Z1, T, alpha, max_iter, tol)
        if softmax_objective(W, Z1, T, alpha) > softmax_objective(W0, Z1, T, alpha):
            W = W0
    # the symmetric gauge: columns sum to zero; the likelihood is unchanged and the penalty can only drop
    return W - W.mean(axis=1, keepdims=True)


def log_softmax_predict(Z1: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``log softmax(Z1 @ W)``: ``(n, C)`` log-probabilities."""
    logits = Z1 @ W
    return logits - logsumexp(logits, axis=1, keepdims=True)
