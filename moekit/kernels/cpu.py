"""float32 CPU matmuls where torch's own are slow: oneDNN for matrix products, OpenBLAS for
matrix-vector products. Used by the model's dense projections and the experts' products.

Why: torch's CPU float32 matmul calls MKL, and MKL runs its AVX2 code on CPUs that are not
Intel's. On the AMD EPYCs (AVX-512) of these benchmarks (docs/benchmarks.md):

- matrix products: MKL's sgemm reaches ~85 GFLOP/s per core, oneDNN ~195 on Zen 5 (on Zen 4,
  whose AVX-512 units are 256 bits wide, 54-96 vs 69-102, 1.2-1.6x on 2 threads). oneDNN ships
  inside torch (mkldnn) and is reached through ``torch.ops.mkldnn._linear_pointwise``, the op
  torch's own compiler emits for linear layers. Its fixed cost per call (~20 us) loses on small
  products, so it takes products of at least ``ONEDNN_MIN_MACS`` multiply-adds. Forward and
  input-gradient products only: a weight gradient ``g.T @ x`` reduces over the rows, and oneDNN's
  linear op would need one operand transposed into a copy first; MKL reads both in place and was
  1.2-6x faster for those on 2 threads (Zen 4, ``bench/cpu_matmul.py``), so they stay torch's;
- matrix-vector products (decode steps, up to ``MATVEC_MAX_ROWS`` rows, weights of at least
  ``MATVEC_MIN_WEIGHT`` elements): MKL streams a weight at ~10 GB/s from memory and ~45 GB/s from
  cache, the OpenBLAS that numpy ships at ~20-27 and ~65 GB/s. The weights are shared with numpy
  without copying. Taken only without autograd and while that OpenBLAS runs one thread (its
  threads and torch's would compete for the cores, 4x slower): :func:`single_threaded_blas` sets
  that up, and ``moekit.inference.generate`` uses it.

Results are IEEE float32 either way (no reduced-precision modes); sums are ordered differently,
so results differ from torch's in the last bits.

oneDNN JIT-compiles a kernel per problem shape (0.4-6 ms the first time, then cached, LRU of
1024). Dense projections see few shapes; the experts' row counts change every step, so the
dispatcher pads each expert's group to :func:`bucket_rows` rows (zero rows, a few percent of work)
and the same few shapes come back.

Used when :func:`enabled` (oneDNN in this torch, an AVX-512 CPU that is not Intel's, where MKL
has full AVX-512 code of its own; ``MOEKIT_CPU_MATMUL=torch`` / ``=fast`` forces it off / on) and
the operands are float32 CPU tensors; everything else keeps torch's matmuls. On the other x86 CPUs
that are not Intel's (AVX2, e.g. Zen 2) only the matrix-vector path is on (:func:`matvec_enabled`):
oneDNN's products are no faster than MKL's there, OpenBLAS's matrix-vector products still are
(1.2-1.4x, docs/benchmarks.md). On both, small inference groups of the experts run as
:func:`batched_ffn` (torch's own batched products, :func:`batched_applies`). On Intel's CPUs every
product stays on MKL: on an AVX-512 Xeon oneDNN was 0.76-1.0x MKL's, the layer's decode step slower
on OpenBLAS and ``batched_ffn`` no steady gain (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Measured crossovers on the machine above (docs/benchmarks.md): oneDNN beats MKL from ~0.5 M
# multiply-adds; one OpenBLAS matrix-vector product per row beats both up to 3 rows.
ONEDNN_MIN_MACS = 1 << 19
MATVEC_MAX_ROWS = 3
# ... with weights of at least this many elements: a small weight stays in cache, where torch's
# call costs less (one row through a router's (8, 256) weight: 2.1 us in torch, 4.2 through numpy).
MATVEC_MIN_WEIGHT = 1 << 14
# Groups from this many rows are padded by bucket_rows.
PAD_MIN_ROWS = 8
# The experts' feed-forward runs group by group (expert_ffn) from this many sorted rows; below, the
# (S, H) intermediates stay in cache and two grouped matmuls (with the matrix-vector path for tiny
# groups) were as fast or faster (docs/benchmarks.md).
FFN_MIN_ROWS = 256
# Up to this many rows in the largest group, on more than one thread, the experts' feed-forward runs
# as two batched products over all the experts (batched_ffn): torch.bmm spreads them over the threads.
BATCHED_MAX_ROWS = 32


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _forced() -> str | None:
    """``MOEKIT_CPU_MATMUL``: ``"torch"`` (fast paths off), ``"fast"`` (on) or None (by the CPU)."""
    forced = os.environ.get("MOEKIT_CPU_MATMUL", "").strip().lower()
    return forced if forced in ("torch", "fast") else None


@functools.cache
def enabled() -> bool:
    """Whether float32 CPU matmuls take this module's paths in this process (decided once)."""
    forced = _forced()
    has_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if forced is not None:
        return forced == "fast" and has_op
    capability = torch.backends.cpu.get_cpu_capability()
    return has_op and capability.startswith("AVX512") and _cpu_vendor() != "GenuineIntel"


@functools.cache
def matvec_enabled() -> bool:
    """Whether few-row float32 products may take numpy's OpenBLAS in this process (decided once):
    where :func:`enabled`, and on other x86 CPUs that are not Intel's (AVX2: MKL's matrix-vector
    product is slower there too, while its matrix products are as fast as oneDNN's, so only this
    path is on; docs/benchmarks.md, Zen 2). ``MOEKIT_CPU_MATMUL`` forces it as :func:`enabled`."""
    forced = _forced()
    if forced is not None:
        return forced == "fast"
    x86_avx2 = torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))  # else DEFAULT, SVE..
    return enabled() or (x86_avx2 and _cpu_vendor() not in ("GenuineIntel", ""))


@functools.cache
def _numpy_openblas():
    """threadpoolctl's handle on the OpenBLAS behind numpy's matmul, or None (another BLAS)."""
    from threadpoolctl import ThreadpoolController

    np.ones((2, 2), dtype=np.float32) @ np.ones(2, dtype=np.float32)  # make sure the BLAS is loaded
    libs = [lib for lib in ThreadpoolController().lib_controllers
            if lib.internal_api == "openblas" and "numpy" in lib.filepath]
    return libs[0] if len(libs) == 1 else None


def matvec_ready() -> bool:
    """Whether few-row products take OpenBLAS now: :func:`matvec_enabled`, numpy's BLAS is
    OpenBLAS, on one thread."""
    if not matvec_enabled():
        return False
    lib = _numpy_openblas()
    return lib is not None and lib.get_num_threads() == 1


def matvec_applies(x: Tensor, w: Tensor) -> bool:
    """True when few-row products ``x @ w.T`` (no autograd) may take OpenBLAS now: as
    :func:`applies` with :func:`matvec_ready` in place of :func:`enabled`."""
    return _eligible(x, w) and matvec_ready()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's OpenBLAS on one thread inside the block (restored after), which turns on the
    matrix-vector path for few-row float32 products on the CPUs of :func:`matvec_enabled`."""
    lib = _numpy_openblas() if matvec_enabled() else None
    if lib is None or lib.get_num_threads() == 1:
        yield
        return
    before = lib.get_num_threads()
    lib.set_num_threads(1)
    try:
        yield
    finally:
        lib.set_num_threads(before)


def batched_applies(x: Tensor, w: Tensor) -> bool:
    """True when the experts' small inference groups may run as :func:`batched_ffn` here. Its two
    ``torch.bmm`` are torch's own kernels (no oneDNN), and giving each thread its own experts paid on
    the CPUs of :func:`matvec_enabled` with or without AVX-512 (Zen 4; Zen 2, where the layer's
    forward at 16-64 tokens ran 1.0-1.3x faster on 2 threads in a quiet phase of the VM and 1.6-2x
    in a busy one: docs/benchmarks.md); on an Intel Xeon (AVX-512, where it is off) it gave no
    steady gain."""
    return _eligible(x, w) and matvec_enabled()


def applies(x: Tensor, w: Tensor) -> bool:
    """True when ``x @ w.T`` should take this module's paths here. Never under ``torch.compile``:
    the compiler picks its own kernels (and its lowering of the oneDNN op wants frozen weights); never
    under CPU autocast (the result dtype would depend on the product's size)."""
    return _eligible(x, w) and enabled()


def _eligible(x: Tensor, w: Tensor) -> bool:
    """float32 CPU operands, outside ``torch.compile`` and CPU autocast."""
    if torch.compiler.is_compiling():  # first: nothing below may break the compiler's graph
        return False
    return (x.is_cpu and x.dtype == torch.float32 and w.dtype == torch.float32 and w.is_cpu
            and not torch.is_autocast_enabled("cpu"))  # autocast: F.linear's dtype rules, whatever the size


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` now (``None`` entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bucket_rows(rows: int) -> int:
    """Rows an expert group is padded to: below ``PAD_MIN_ROWS`` none; else a multiple of 8, and of
    ``2**(floor(log2(rows)) - 4)`` (at most 7 extra rows below 128 rows, 1/16 from there), so a run meets ~16
    distinct row counts per octave."""
    if rows < PAD_MIN_ROWS:
        return max(rows, 0)
    step = max(8, 1 << max(0, rows.bit_length() - 5))
    return -(-rows // step) * step


def gemv_rows(x_MI: Tensor, w_OI: Tensor) -> Tensor:
    """``x_MI @ w_OI.T`` as one numpy (OpenBLAS) matrix-vector product per row, ``(M, O)``; no
    autograd. For the few rows of a decode step: after the first row the weight is in cache."""
    w, x = w_OI.numpy(force=True), x_MI.numpy(force=True)
    if x.shape[0] == 1:
        return torch.from_numpy(np.matmul(w, x[0])[None])
    out = np.empty((x.shape[0], w.shape[0]), dtype=x.dtype)
    for row in range(x.shape[0]):
        np.matmul(w, x[row], out=out[row])
    return torch.from_numpy(out)


def _forward(x_MI: Tensor, w_OI: Tensor) -> Tensor:
    """``x_MI @ w_OI.T`` (2-D float32 CPU operands) by the fastest path for its size; no autograd."""
    rows = x_MI.shape[0]
    if _takes_matvec(rows, w_OI):
        return gemv_rows(x_MI, w_OI)
    return _mm_t(x_MI, w_OI) if _use_onednn(rows, w_OI) else F.linear(x_MI, w_OI)


def _takes_matvec(rows: int, w_OI: Tensor) -> bool:
    """Whether a ``rows``-row product with ``w_OI`` (no autograd) takes OpenBLAS's matrix-vector path."""
    return rows <= MATVEC_MAX_ROWS and w_OI.numel() >= MATVEC_MIN_WEIGHT and matvec_ready()


def _use_onednn(rows: int, w_OI: Tensor) -> bool:
    """Whether a ``rows``-row product with ``w_OI`` is big enough for oneDNN's fixed cost."""
    return enabled() and rows * w_OI.shape[0] * w_OI.shape[1] >= ONEDNN_MIN_MACS


def _mm_t(x_MI: Tensor, w_OI: Tensor) -> Tensor:
    """``x_MI @ w_OI.T`` by oneDNN; any strides."""
    return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, None, "none", [], "")


def mm_t(x_MI: Tensor, w_OI: Tensor) -> Tensor:
    """``x_MI @ w_OI.T`` for 2-D operands (any strides), by this module where :func:`applies`;
    no autograd."""
    return _forward(x_MI, w_OI) if applies(x_MI, w_OI) else x_MI @ w_OI.T


class _Linear(torch.autograd.Function):
    """``y = x @ w.T (+ b)`` for 2-D ``x``; forward and input gradient through oneDNN."""

    @staticmethod
    def forward(ctx, x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_MI, w_OI)
        ctx.has_bias = b_O is not None
        b_O = None if b_O is None else b_O.contiguous()  # oneDNN reads the bias as contiguous
        return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, b_O, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_MO: Tensor):
        x_MI, w_OI = ctx.saved_tensors
        g_MO = g_MO.contiguous()
        gx = _mm_t(g_MO, w_OI.T) if ctx.needs_input_grad[0] else None
        gw = g_MO.T @ x_MI if ctx.needs_input_grad[1] else None  # torch's (MKL), see the module docstring
        gb = g_MO.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear``; float32 CPU matmuls where :func:`applies` take oneDNN (with
    autograd) or OpenBLAS (without) by size, where only :func:`matvec_enabled` OpenBLAS for few
    rows without autograd; see the module docstring.

    Args:
        x: ``(..., I)``; weight: ``(O, I)``; bias: ``(O,)`` or ``None``.

    Returns:
        ``(..., O)``.
    """
    if x.numel() == 0 or (bias is not None and bias.dtype != torch.float32) or not _eligible(x, weight):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    grad = records_grad(x, weight, bias)
    if not enabled() and (grad or not _takes_matvec(rows, weight)):  # here only the matrix-vector path
        return F.linear(x, weight, bias)
    x_MI = x if x.dim() == 2 else x.reshape(rows, x.shape[-1])  # (a reshape is ~1.4 us at one row)
    if grad:
        if not _use_onednn(rows, weight):
            return F.linear(x, weight, bias)
        y = _Linear.apply(x_MI, weight, bias)
    else:
        y = _forward(x_MI, weight)
        if bias is not None:
            y = y + bias
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


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
    matvec = matvec_ready() and any(stop - start <= MATVEC_MAX_ROWS for _, start, stop in groups)
    if matvec:  # numpy views once, then one matrix-vector product per row straight into y_SO
        x, w, y = x_SI.numpy(force=True), w_EOI.numpy(force=True), y_SO.numpy()
    for expert, start, stop in groups:
        if matvec and stop - start <= MATVEC_MAX_ROWS:
            for row in range(start, stop):
                np.matmul(w[expert], x[row], out=y[row])
        else:
            y_SO[start:stop] = _forward(x_SI[start:stop], w_EOI[expert])
    return y_SO


class _GroupedMM(torch.autograd.Function):
    """Grouped ``y_SO[s] = x_SI[s] @ w_EOI[expert(s)].T``; each group's forward and input-gradient
    products on oneDNN or torch by size, weight gradients on torch's."""

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
                if _use_onednn(stop - start, w_EOI[expert]):
                    gx[start:stop] = _mm_t(rows, w_EOI[expert].T)
                else:
                    torch.mm(rows, w_EOI[expert], out=gx[start:stop])
        if ctx.needs_input_grad[1]:
            gw = torch.empty_like(w_EOI)
            used = {expert for expert, _, _ in ctx.groups}
            for expert in range(w_EOI.shape[0]):
                if expert not in used:
                    gw[expert].zero_()
            for expert, start, stop in ctx.groups:  # torch's (MKL), see the module docstring
                torch.mm(g_SO[start:stop].T, x_SI[start:stop], out=gw[expert])
        return gx, gw, None


def _ffn_forward(x_SI: Tensor, w_EHI: Tensor, w_EOF: Tensor, groups: list[tuple[int, int, int]],
                 activate: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``y_SO`` and each group's first-product output ``h (rows, H)``, one group at a time."""
    y_SO = x_SI.new_empty(x_SI.shape[0], w_EOF.shape[1])
    hs = []
    for expert, start, stop in groups:
        h = _forward(x_SI[start:stop], w_EHI[expert])
        y_SO[start:stop] = _forward(activate(h), w_EOF[expert])
        hs.append(h)
    return y_SO, hs


def _input_grad(g_MO: Tensor, w_OI: Tensor, out: Tensor) -> None:
    """``out = g_MO @ w_OI``: oneDNN when big enough, else torch's, written in place."""
    if _use_onednn(g_MO.shape[0], w_OI):
        out.copy_(_mm_t(g_MO, w_OI.T))
    else:
        torch.mm(g_MO, w_OI, out=out)


class _ExpertFFN(torch.autograd.Function):
    """``y = down(activate(x @ w_in.T))`` per expert group; see :func:`expert_ffn`."""

    @staticmethod
    def forward(ctx, x_SI: Tensor, w_EHI: Tensor, w_EOF: Tensor, counts_E: Tensor,
                activate: Callable[[Tensor], Tensor]) -> Tensor:
        groups = _groups(counts_E)
        y_SO, hs = _ffn_forward(x_SI, w_EHI, w_EOF, groups, activate)
        ctx.save_for_backward(x_SI, w_EHI, w_EOF, *hs)
        ctx.groups, ctx.activate = groups, activate
        return y_SO

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_SO: Tensor):
        x_SI, w_EHI, w_EOF, *hs = ctx.saved_tensors
        want_x, want_in, want_down = ctx.needs_input_grad[:3]
        g_SO = g_SO.contiguous()
        gx = x_SI.new_empty(x_SI.shape) if want_x else None
        g_in = torch.zeros_like(w_EHI) if want_in else None
        g_down = torch.zeros_like(w_EOF) if want_down else None
        for (expert, start, stop), h in zip(ctx.groups, hs):
            g_rows = g_SO[start:stop]
            with torch.enable_grad():  # the activation again, this time on autograd's graph
                h = h.detach().requires_grad_(True)
                a = ctx.activate(h)
            if want_down:  # weight gradients: torch's (MKL), see the module docstring
                torch.mm(g_rows.T, a.detach(), out=g_down[expert])
            g_a = g_rows.new_empty(a.shape)
            _input_grad(g_rows, w_EOF[expert], g_a)
            (g_h,) = torch.autograd.grad(a, h, g_a)
            if want_in:
                torch.mm(g_h.T, x_SI[start:stop], out=g_in[expert])
            if want_x:
                _input_grad(g_h, w_EHI[expert], gx[start:stop])
        return gx, g_in, g_down, None, None


def expert_ffn(x_SI: Tensor, w_EHI: Tensor, w_EOF: Tensor, counts_E: Tensor,
               activate: Callable[[Tensor], Tensor]) -> Tensor:
    """The routed experts' whole feed-forward over expert-sorted rows, one expert group at a time:
    ``y_SO[s] = activate(x_SI[s] @ w_EHI[e].T) @ w_EOF[e].T`` for the expert ``e`` of row ``s``.

    Each group's intermediate ``(rows, H)`` is made and used while it is in cache, instead of the
    two ``(S, H)`` buffers of two grouped matmuls and an activation between them (and the copies of
    each group's oneDNN output into them): 1.1-1.4x faster for 2048 tokens on the Zen 4 CPU, not
    faster below ``FFN_MIN_ROWS`` rows (docs/benchmarks.md). Products as :func:`mm_t` would compute
    them; with autograd, backward recomputes ``activate`` per group (it saves ``x_SI`` and the
    groups' ``h``, not the activation).

    Args:
        x_SI: ``(S, I)`` rows sorted by expert; counts_E: ``(E,)`` rows per expert.
        w_EHI: ``(E, H, I)`` first projection (``gate_up_proj`` or ``up_proj``).
        w_EOF: ``(E, O, F)`` down projection.
        activate: ``(rows, H) -> (rows, F)``, differentiable when autograd is recording; it must
            not modify its input (with autograd the groups' ``h`` are saved for the backward).

    Returns:
        ``(S, O)``.
    """
    if records_grad(x_SI, w_EHI, w_EOF):
        return _ExpertFFN.apply(x_SI, w_EHI, w_EOF, counts_E, activate)
    return _ffn_forward(x_SI, w_EHI, w_EOF, _groups(counts_E), activate)[0]


def batched_ffn(x_SI: Tensor, w_EHI: Tensor, w_EOF: Tensor, counts_E: Tensor,
                activate: Callable[[Tensor], Tensor]) -> Tensor:
    """The routed experts' whole feed-forward, as :func:`expert_ffn` computes it, for small groups:
    every group zero-padded to the largest, ``M`` rows, then two batched products over all ``E``
    experts, ``(E, M, I) @ (E, I, H)`` and ``(E, M, F) @ (E, F, O)``, with ``activate`` between.

    A product of a few rows with one expert's weight keeps one thread busy at best; ``torch.bmm``
    gives each thread its own experts. Worth the padding while groups are small, up to
    ``BATCHED_MAX_ROWS`` rows: the layer's forward 1.0-1.3x faster for 5-96 tokens (8 experts,
    top-2, D=256, F=512) on 2 threads of the Zen 4 CPU but ~0.9x on one thread, and greedy decoding
    at batch 8-16 1.1-1.2x faster; on Zen 2 the forward 1.0-1.3x (a quiet VM) to 1.6-2x faster
    for 16-64 tokens, greedy decoding at batch 8 1.1x (docs/benchmarks.md). The weights' layout
    (``nn.Linear``'s) is read in place. Differentiable by torch's autograd, but forward and
    backward together were 1.2-1.5x slower than two grouped matmuls (the padded rows' products):
    ``Experts`` takes it for inference on more than one thread only.

    Args and returns as :func:`expert_ffn`.
    """
    experts, rows = counts_E.numel(), int(counts_E.max())
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    # Row s of expert e's group (sorted position start_e + j) goes to padded row e * rows + j.
    shift_E = torch.arange(experts) * rows - starts_E
    pos_S = torch.arange(x_SI.shape[0]) + torch.repeat_interleave(shift_E, counts_E, output_size=len(x_SI))
    x_EMI = x_SI.new_zeros(experts * rows, x_SI.shape[1]).index_copy(0, pos_S, x_SI)
    h_EMH = torch.bmm(x_EMI.view(experts, rows, x_SI.shape[1]), w_EHI.transpose(1, 2))
    a_EMF = activate(h_EMH.view(experts * rows, w_EHI.shape[1])).view(experts, rows, w_EOF.shape[2])
    y_EMO = torch.bmm(a_EMF, w_EOF.transpose(1, 2))
    return y_EMO.view(experts * rows, w_EOF.shape[1]).index_select(0, pos_S)


def grouped_mm_cpu(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """The grouped matmul of :func:`moekit.kernels.grouped_mm`, each group as :func:`mm_t` would
    (float32 CPU where :func:`applies`). Any group sizes are correct; sizes from :func:`bucket_rows`
    avoid recompiling oneDNN kernels."""
    if not records_grad(x_SI, w_EOI):
        return _grouped_forward(x_SI, w_EOI, _groups(counts_E))
    return _GroupedMM.apply(x_SI, w_EOI, counts_E)
