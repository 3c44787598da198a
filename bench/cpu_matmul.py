"""float32 CPU matmuls: torch's own (MKL) against the paths of moekit.kernels.cpu, side by side.

The measurements behind ``moekit.kernels.cpu``'s choices, on this machine, one thread:

1. matrix products of training sizes, GFLOP/s of torch (MKL) and oneDNN: forward ``x (M, I) @ w (O, I).T``
   and weight gradient ``g (M, O).T @ x (M, I)`` (oneDNN's linear op needs one operand transposed
   into a copy for it; the faster of its two orientations is timed);
2. decode-sized products (M = 1..16 rows) with the weight hot in cache (the same weight every
   call) and cold (cycling through 64 MB of weights): microseconds of torch (MKL), oneDNN, and one
   OpenBLAS (numpy) matrix-vector product per row;
3. the LM head + cross-entropy of one training step (2048 tokens, D=256, V=4096) with both
   gradients: ``F.cross_entropy`` on materialised logits vs ``moekit.models.loss.linear_cross_entropy``;
4. the weight's memory layout for torch's (MKL) forward product, hot and cold as in 2: ``x @ w.T``
   with ``w`` stored ``(O, I)`` (``nn.Linear``'s, and the experts' in moekit and transformers)
   against the same product with the weight stored ``(I, O)`` (``x @ w_t``), at the experts' sizes.

    .venv/bin/python bench/cpu_matmul.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moekit.kernels import cpu, linear
from moekit.models.loss import linear_cross_entropy


def best_seconds(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def mkl(x, w):
    return x @ w.T


def onednn_weight_grad(g, x):
    if g.shape[1] > x.shape[1]:
        return onednn(x.T, g.T).T.contiguous()
    return onednn(g.T, x.T)


def mkl_weight_grad(g, x):
    return g.T @ x


def time_product(fn, x, weights: list[torch.Tensor], cold: bool, calls: int = 200) -> float:
    """Seconds per ``fn(x, w)``: the same weight every call (hot) or the next of ``weights`` (cold)."""
    if not cold:
        return best_seconds(lambda: fn(x, weights[0]), calls)
    order = iter(range(10**12))
    return best_seconds(lambda: fn(x, weights[next(order) % len(weights)]), len(weights))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, moekit fast paths enabled: {cpu.enabled()}")
    print("\n1. matrix products, GFLOP/s")
    print("| M x I x O | forward MKL | forward oneDNN | oneDNN / MKL | weight grad MKL | weight grad oneDNN "
          "| oneDNN / MKL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, i, o in [(2048, 256, 256), (2048, 256, 1024), (512, 256, 1024), (512, 512, 256), (2048, 256, 8),
                    (64, 256, 1024), (16, 256, 1024)]:
        x, w = torch.randn(m, i), [torch.randn(o, i)]
        calls = max(3, int(2e8 // (m * i * o)))
        t_mkl, t_dnn = time_product(mkl, x, w, False, calls), time_product(onednn, x, w, False, calls)
        g = [torch.randn(m, o)]
        t_mkl_wg = time_product(lambda x, g: mkl_weight_grad(g, x), x, g, False, calls)
        t_dnn_wg = time_product(lambda x, g: onednn_weight_grad(g, x), x, g, False, calls)
        gflop = 2 * m * i * o / 1e9
        print(f"| {m} x {i} x {o} | {gflop / t_mkl:.0f} | {gflop / t_dnn:.0f} | {t_mkl / t_dnn:.2f} "
              f"| {gflop / t_mkl_wg:.0f} | {gflop / t_dnn_wg:.0f} | {t_mkl_wg / t_dnn_wg:.2f} |")

    with cpu.single_threaded_blas():
        print("\n2. decode-sized products, us per call (hot = same weight every call, cold = 64 MB cycled)")
        print("| weight O x I | M | torch hot | oneDNN hot | OpenBLAS rows hot | torch cold | oneDNN cold "
              "| OpenBLAS rows cold |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for o, i in [(1024, 256), (256, 256), (4096, 256)]:
            weights = [torch.randn(o, i) for _ in range(max(1, (64 << 20) // (4 * o * i)))]
            for m in (1, 2, 3, 4, 8, 16):
                x = torch.randn(m, i)
                row = [f"{time_product(fn, x, weights, cold) * 1e6:.1f}"
                       for cold in (False, True) for fn in (mkl, onednn, cpu.gemv_rows)]
                print(f"| {o} x {i} | {m} | " + " | ".join(row) + " |")

    print("\n3. LM head + cross-entropy, loss and both gradients, ms")
    h = torch.randn(2048, 256, requires_grad=True)
    w = (torch.randn(4096, 256) * 0.05).requires_grad_()
    labels = torch.randint(0, 4096, (2048,))

    def plain():
        F.cross_entropy(linear(h, w).float(), labels).backward()

    def fused():
        linear_cross_entropy(h, w, labels).backward()

    t_plain, t_fused = best_seconds(plain, 5), best_seconds(fused, 5)
    print(f"F.cross_entropy on logits {t_plain * 1e3:.1f} | linear_cross_entropy {t_fused * 1e3:.1f} | "
          f"ratio {t_plain / t_fused:.2f}")

    print("\n4. torch (MKL) forward by weight layout, us per call: x @ w.T, w (O, I) vs x @ w_t, w_t (I, O)")
    print("| O x I | M | (O, I) hot | (I, O) hot | ratio hot | (O, I) cold | (I, O) cold | ratio cold |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for o, i in [(1024, 256), (256, 512)]:
        weights = [torch.randn(o, i) for _ in range(max(1, (64 << 20) // (4 * o * i)))]
        transposed = [w.T.contiguous() for w in weights]
        for m in (1, 4, 8, 16, 24, 32, 48, 64, 256):
            x = torch.randn(m, i)
            t = [time_product(fn, x, ws, cold) * 1e6 for cold in (False, True)
                 for fn, ws in ((mkl, weights), (torch.mm, transposed))]
            print(f"| {o} x {i} | {m} | {t[0]:.1f} | {t[1]:.1f} | {t[0] / t[1]:.2f} | {t[2]:.1f} "
                  f"| {t[3]:.1f} | {t[2] / t[3]:.2f} |")


if __name__ == "__main__":
    main()
