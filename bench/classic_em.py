"""Classic MoE by EM: fit time on 100k x 10 with K=4 Gaussian linear experts, and held-out error.

Data: a piecewise-linear regression in 10 features. The gate depends on the first two features: 4
regimes (quadrants of x0, x1), each with its own linear function of all 10 features and its own noise.
Compared on the same split, from one run: moekit's MixtureOfExpertsRegressor (K=4, linear experts),
scikit-learn's LinearRegression and a DecisionTreeRegressor (max_depth tuned on a validation split).

    .venv/bin/python bench/classic_em.py [--n 100000] [--repeats 3] [--blas-threads 1] [--gate-max-iter 3]
                                         [--moe-blas-threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_squared_error
from sklearn.tree import DecisionTreeRegressor
from threadpoolctl import threadpool_limits

from moekit.classic import MixtureOfExpertsRegressor

NOISE = [0.3, 0.5, 0.4, 0.6]  # noise sd of the 4 regimes


def make_data(n: int, p: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    regime = (X[:, 0] > 0).astype(int) * 2 + (X[:, 1] > 0).astype(int)  # 4 quadrants
    coef = rng.standard_normal((4, p)) * 2.0
    intercept = np.array([-3.0, -1.0, 1.0, 3.0])
    noise = np.array(NOISE)
    y = np.einsum("np,np->n", X, coef[regime]) + intercept[regime] + noise[regime] * rng.standard_normal(n)
    return X, y


def timed(fn, repeats: int):
    """Best wall time and best CPU time of this process over ``repeats`` calls (the CPU time is what
    an idle machine would take with single-threaded BLAS; on a busy one the wall time is inflated)."""
    best, best_cpu, out = np.inf, np.inf, None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best, best_cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="training rows")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    ap.add_argument("--gate-max-iter", type=int, default=3, help="moekit gate Newton steps per M-step")
    ap.add_argument("--blas-threads", type=int, default=0,
                    help="limit BLAS threads for all three models (0: library default; moekit's EM "
                         "with built-in experts runs on --moe-blas-threads)")
    ap.add_argument("--moe-blas-threads", type=int, default=1,
                    help="the MoE's blas_threads (default 1; 0: None, the process's setting)")
    args = ap.parse_args()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    if args.blas_threads:
        threadpool_limits(limits=args.blas_threads, user_api="blas")
    X, y = make_data(args.n + 40_000)
    Xtr, ytr = X[: args.n], y[: args.n]
    Xva, yva = X[args.n: args.n + 20_000], y[args.n: args.n + 20_000]
    Xte, yte = X[args.n + 20_000:], y[args.n + 20_000:]

    moe = MixtureOfExpertsRegressor(n_experts=4, gate_max_iter=args.gate_max_iter, random_state=0,
                                    blas_threads=args.moe_blas_threads or None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning would make the timing meaningless
        t_moe, c_moe, moe = timed(lambda: moe.fit(Xtr, ytr), args.repeats)
    t_lin, c_lin, lin = timed(lambda: LinearRegression().fit(Xtr, ytr), args.repeats)
    depths = [4, 6, 8, 10, 12, 14, 16]
    trees = {d: DecisionTreeRegressor(max_depth=d, random_state=0).fit(Xtr, ytr) for d in depths}
    best_depth = min(depths, key=lambda d: mean_squared_error(yva, trees[d].predict(Xva)))
    one_tree = DecisionTreeRegressor(max_depth=best_depth, random_state=0)
    t_tree, c_tree, tree = timed(lambda: one_tree.fit(Xtr, ytr), args.repeats)

    mse = {name: mean_squared_error(yte, m.predict(Xte)) for name, m in
           [("moe", moe), ("linear", lin), ("tree", tree)]}
    print(f"data: {args.n} train rows x {X.shape[1]} features, 4 regimes; test rows {len(yte)}; "
          f"noise-only MSE ~ {np.mean(np.array(NOISE) ** 2):.3f}")
    print(f"BLAS threads: {args.blas_threads or 'library default'}, the MoE's blas_threads="
          f"{args.moe_blas_threads or None}; load average before: {load}")
    print(f"moekit MoE K=4 linear experts: fit {t_moe:.3f} s wall / {c_moe:.3f} s CPU "
          f"(best of {args.repeats}), {moe.n_iter_} EM iterations, converged={moe.converged_}, "
          f"test MSE {mse['moe']:.4f}")
    print(f"  noise sd, sorted: fitted {np.sort(np.sqrt(moe.experts_.sigma2_)).round(4).tolist()}, "
          f"true {sorted(NOISE)}")
    print(f"LinearRegression:              fit {t_lin:.3f} s wall / {c_lin:.3f} s CPU, "
          f"test MSE {mse['linear']:.4f}")
    print(f"DecisionTree (max_depth={best_depth:2d}):   fit {t_tree:.3f} s wall / {c_tree:.3f} s CPU, "
          f"test MSE {mse['tree']:.4f}")
    print(f"ratios: MSE linear/moe = {mse['linear'] / mse['moe']:.1f}x, "
          f"tree/moe = {mse['tree'] / mse['moe']:.1f}x; "
          f"fit time moe/linear = {t_moe / t_lin:.1f}x, moe/tree = {t_moe / t_tree:.2f}x")


if __name__ == "__main__":
    main()
