"""float32 CPU matmuls through oneDNN: the model's dense projections and the experts' grouped GEMM.

Why not ``torch.mm``: torch's CPU float32 matmul calls MKL's sgemm, and MKL runs its AVX2 code on
CPUs that are not Intel's. On the AMD EPYC (Zen 5, AVX-512) these benchmarks run on, MKL reaches
~85 GFLOP/s per core and oneDNN (shipped inside torch as mkldnn, reached through the
``torch.ops.mkldnn._linear_pointwise`` op that torch's own compiler emits) ~195 GFLOP/s, see
docs/benchmarks.md. Results are IEEE float32 matmuls either way (no reduced-precision modes).

oneDNN JIT-compiles a kernel per problem shape (0.4-6 ms the first time, then cached, LRU of
1024). Dense projections see few shapes; the experts' row counts change every step, so the
dispatcher pads each expert's group to :func:`bucket_rows` rows (zero rows, a few percent of work)
and the same few shapes come back.

Used when :func:`enabled` (oneDNN in this torch, an AVX-512 CPU that is not Intel's, where MKL
has full AVX-512 code of its own) and the operands are float32 CPU tensors with at least
``MIN_ROWS`` rows; ``MOEKIT_ONEDNN=1`` / ``=0`` forces it on / off. Everything else keeps
``torch.nn.functional.linear`` / the ``grouped`` backend's own strategies.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many rows (decode steps) MKL's matrix-vector code is faster than oneDNN's.
MIN_ROWS = 8


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def enabled() -> bool:
    """Whether float32 CPU matmuls go through oneDNN in this process (decided once)."""
    forced = os.environ.get("MOEKIT_ONEDNN", "").strip()
    has_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if forced in ("0", "1"):
        return forced == "1" and has_op
    capability = torch.backends.cpu.get_cpu_capability()
    return has_op and capability.startswith("AVX512") and _cpu_vendor() != "GenuineIntel"


def applies(x: Tensor, w: Tensor) -> bool:
    """True when ``x @ w.T`` should run through oneDNN here."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and enabled()
    )


def bucket_rows(rows: int) -> int:
    """Rows an expert group is padded to: a multiple of 8, then of ``2**(floor(log2(rows)) - 4)``
    (at most 1/16 extra rows), so a training run meets ~16 distinct row counts per octave."""
    if rows <= 0:
        return 0
    step = max(8, 1 << max(0, rows.bit_length() - 5))
    return -(-rows // step) * step


def _mm_t(x_MI: Tensor, w_OI: Tensor) -> Tensor:
    """``x_MI @ w_OI.T`` by oneDNN; any strides."""
    return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, None, "none", [], "")


def _weight_grad(g_MO: Tensor, x_MI: Tensor) -> Tensor:
    """``g_MO.T @ x_MI`` ``(O, I)`` contiguous; oneDNN is fastest with the wider side as its columns."""
    if g_MO.shape[1] > x_MI.shape[1]:
        return _mm_t(x_MI.T, g_MO.T).T.contiguous()
    return _mm_t(g_MO.T, x_MI.T)


def mm_t(x_MI: Tensor, w_OI: Tensor) -> Tensor:
    """``x_MI @ w_OI.T`` for 2-D operands (any strides), on oneDNN where :func:`applies`; no autograd."""
    if x_MI.shape[0] >= MIN_ROWS and applies(x_MI, w_OI):
        return _mm_t(x_MI, w_OI)
    return x_MI @ w_OI.T


def mm_tn(g_MO: Tensor, x_MI: Tensor) -> Tensor:
    """``g_MO.T @ x_MI`` ``(O, I)``, a weight gradient, on oneDNN where :func:`applies`; no autograd."""
    if g_MO.shape[0] >= MIN_ROWS and applies(g_MO, x_MI):
        return _weight_grad(g_MO, x_MI)
    return g_MO.T @ x_MI


class _Linear(torch.autograd.Function):
    """``y = x @ w.T (+ b)`` for 2-D ``x``; both passes through oneDNN."""

    @staticmethod
    def forward(ctx, x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_MI, w_OI)
        ctx.has_bias = b_O is not None
        return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, b_O, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_MO: Tensor):
        x_MI, w_OI = ctx.saved_tensors
        g_MO = g_MO.contiguous()
        gx = _mm_t(g_MO, w_OI.T) if ctx.needs_input_grad[0] else None
        gw = _weight_grad(g_MO, x_MI) if ctx.needs_input_grad[1] else None
        gb = g_MO.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear`` with float32 CPU matmuls of ``>= MIN_ROWS`` rows on oneDNN.

    Args:
        x: ``(..., I)``; weight: ``(O, I)``; bias: ``(O,)`` or ``None``.

    Returns:
        ``(..., O)``.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < MIN_ROWS or not applies(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    y = _Linear.apply(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _groups(counts_E: Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` of each non-empty group."""
    out, start = [], 0
    for expert, count in enumerate(counts_E.tolist()):
        if count:
            out.append((expert, start, start + count))
            start += count
    return out


def _grouped_forward(x_SI: Tensor, w_EOI: Tensor, groups: list[tuple[int, int, int]]) -> Tensor:
    y_SO = x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])
    for expert, start, stop in groups:
        rows = x_SI[start:stop]
        if stop - start < MIN_ROWS:
            torch.mm(rows, w_EOI[expert].T, out=y_SO[start:stop])
        else:
            y_SO[start:stop] = _mm_t(rows, w_EOI[expert])
    return y_SO


class _GroupedMM(torch.autograd.Function):
    """Grouped ``y_SO[s] = x_SI[s] @ w_EOI[expert(s)].T``, forward and backward per group on oneDNN."""

    @staticmethod
    def forward(ctx, x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
        groups = _groups(counts_E)
        ctx.save_for_backward(x_SI, w_EOI)
        ctx.groups = groups
        return _grouped_forward(x_SI, w_EOI, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_SO: Tensor):
        x_SI, w_EOI = ctx.saved_tensors
        g_SO = g_SO.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = x_SI.new_empty(x_SI.shape)
            for expert, start, stop in ctx.groups:
                rows = g_SO[start:stop]
                if stop - start < MIN_ROWS:
                    torch.mm(rows, w_EOI[expert], out=gx[start:stop])
                else:
                    gx[start:stop] = _mm_t(rows, w_EOI[expert].T)
        if ctx.needs_input_grad[1]:
            gw = torch.empty_like(w_EOI)
            used = {expert for expert, _, _ in ctx.groups}
            for expert in range(w_EOI.shape[0]):
                if expert not in used:
                    gw[expert].zero_()
            for expert, start, stop in ctx.groups:
                if stop - start < MIN_ROWS:
                    torch.mm(g_SO[start:stop].T, x_SI[start:stop], out=gw[expert])
                else:
                    gw[expert] = _weight_grad(g_SO[start:stop], x_SI[start:stop])
        return gx, gw, None


def grouped_mm_onednn(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """The grouped matmul of :func:`moekit.kernels.grouped_mm` with each group on oneDNN (float32 CPU).

    Groups of fewer than ``MIN_ROWS`` rows use ``torch.mm``; any group sizes are correct, sizes
    from :func:`bucket_rows` avoid recompiling kernels.
    """
    if not (x_SI.requires_grad or w_EOI.requires_grad) or not torch.is_grad_enabled():
        return _grouped_forward(x_SI, w_EOI, _groups(counts_E))
    return _GroupedMM.apply(x_SI, w_EOI, counts_E)
