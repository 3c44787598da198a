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


def softmax_objective(W: np.ndarray, Z1: np.ndarray, T: np.ndarray, alpha: float) -> float:
    """Penalised negative log-likelihood ``f(W)`` (see the module docstring); ``W`` is ``(d1, C)``."""
    logits = Z1 @ W
    lse = logsumexp(logits, axis=1)
    return float(-(T * logits).sum() + T.sum(axis=1) @ lse + 0.5 * alpha * np.sum(W[:-1] ** 2))


def _value_grad(W: np.ndarray, Z1: np.ndarray, T: np.ndarray, alpha: float):
    logits = Z1 @ W  # (n, C)
    lse = logsumexp(logits, axis=1)
    P = np.exp(logits - lse[:, None])
    w = T.sum(axis=1)
    f = float(-(T * logits).sum() + w @ lse + 0.5 * alpha * np.sum(W[:-1] ** 2))
    G = Z1.T @ (w[:, None] * P - T)  # (d1, C)
    G[:-1] += alpha * W[:-1]
    return f, G, P, w


def _hessian(Z1: np.ndarray, P: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Exact Hessian in the column-major vectorisation ``vec(W) = W.T.ravel()``: ``(C*d1, C*d1)``.

    H = sum_i w_i (diag(p_i) - p_i p_i^T) kron z_i z_i^T, computed as one block-diagonal term and one
    rank-structured term, two matrix products in all.
    """
    n, d1 = Z1.shape
    C = P.shape[1]
    sw = np.sqrt(w)
    U = (Z1[:, None, :] * (sw[:, None] * P)[:, :, None]).reshape(n, C * d1)  # rows: sqrt(w) p_c z
    H = -(U.T @ U)
    diag_blocks = (U.T @ (sw[:, None] * Z1)).reshape(C, d1, d1)  # sum_i w p_c z z^T
    for c in range(C):
        sl = slice(c * d1, (c + 1) * d1)
        H[sl, sl] += diag_blocks[c]
        H[sl, sl][np.arange(d1 - 1), np.arange(d1 - 1)] += alpha
    return H


def _fit_newton(W, Z1, T, alpha, max_iter, tol):
    d1, C = W.shape
    f, G, P, w = _value_grad(W, Z1, T, alpha)
    scale = max(float(w.sum()), 1.0)
    for _ in range(max_iter):
        if np.max(np.abs(G)) <= tol * scale:
            break
        H = _hessian(Z1, P, w, alpha)
        jitter = 1e-10 * (np.trace(H) / H.shape[0] + 1e-12)
        g = G.T.ravel()
        try:
            step = np.linalg.solve(H + jitter * np.eye(H.shape[0]), g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(H, g, rcond=None)[0]
        D = step.reshape(C, d1).T
        slope = float(g @ step)
        if not np.isfinite(slope) or slope <= 0:  # not a descent direction: fall back to the gradient
            D, slope = G / scale, float(np.sum(G * G)) / scale
        t, accepted = 1.0, False
        for _ in range(_MAX_HALVINGS):
            W_new = W - t * D
            f_new = softmax_objective(W_new, Z1, T, alpha)
            if np.isfinite(f_new) and f_new <= f - _ARMIJO * t * slope:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        decrease = f - f_new
        W = W_new
        f, G, P, w = _value_grad(W, Z1, T, alpha)
        if decrease <= tol * max(abs(f), 1.0):
            break
    return W


def _fit_lbfgs(W, Z1, T, alpha, max_iter, tol):
    d1, C = W.shape
    scale = max(float(T.sum()), 1.0)

    def fun(v):
        f, G, _, _ = _value_grad(v.reshape(d1, C), Z1, T, alpha)
        return f / scale, G.ravel() / scale

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
    tol: float = 1e-6,
) -> np.ndarray:
    """Improve ``W0`` ``(d1, C)`` for soft targets ``T`` ``(n, C)`` on features ``Z1`` ``(n, d1)``.

    ``solver="newton"``: Newton-Raphson (IRLS) with the exact Hessian and an Armijo backtracking line
    search; ``solver="lbfgs"``: scipy's L-BFGS-B. The result never has a larger objective than ``W0``.
    """
    C = T.shape[1]
    if C == 1:
        return W0
    if Z1.shape[1] == 1:  # constant gate: the intercept-only optimum is closed form
        tot = T.sum(axis=0)
        W = np.log(np.maximum(tot / max(tot.sum(), 1e-300), 1e-300))[None, :]
        return W - W.mean()
    f0 = softmax_objective(W0, Z1, T, alpha)
    if solver == "newton":
        W = _fit_newton(W0.copy(), Z1, T, alpha, max_iter, tol)
    else:
        W = _fit_lbfgs(W0.copy(), Z1, T, alpha, max_iter, tol)
    W = W - W.mean(axis=1, keepdims=True)  # the symmetric gauge: columns sum to zero, f unchanged
    f1 = softmax_objective(W, Z1, T, alpha)
    return W if f1 <= f0 else W0


def log_softmax_predict(Z1: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``log softmax(Z1 @ W)``: ``(n, C)`` log-probabilities."""
    logits = Z1 @ W
    return logits - logsumexp(logits, axis=1, keepdims=True)
