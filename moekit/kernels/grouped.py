"""The ``grouped`` backend: one grouped GEMM where torch has it, cheap fallbacks elsewhere.

Strategy, picked per call:
- float32 on a CPU where oneDNN is enabled (:mod:`moekit.kernels.cpu`): each group by oneDNN;
  where only its matrix-vector path is (AVX2), inference batches below ``CPU_GROUPED_MM_MIN_ROWS``
  rows take the loop below with groups of up to 3 rows on OpenBLAS;
- ``torch.nn.functional.grouped_mm`` when it exists and accepts the dtype (fp32/bf16/fp16), the
  device (CUDA: sm80+) and the 16-byte stride/alignment rule. For bf16 on Hopper / Blackwell
  (sm90, sm100) torch runs one CUTLASS kernel: no host sync, each expert's weight read once, which
  is what a memory-bound decode step needs; other dtypes and GPUs get torch's fallback, a loop of
  matmuls after a host read of the offsets (as of torch 2.10). On CPU without
  autograd only from ``CPU_GROUPED_MM_MIN_ROWS`` rows: torch's CPU kernel loops over every expert,
  empty ones included, so the loop below wins for a few rows;
- on a GPU where grouped_mm cannot run, a few rows (``S <= GATHER_MAX_ROWS``): gather each row's
  expert weight and ``bmm``: no host sync (CUDA-graph friendly), at the cost of copying the weights;
- otherwise a loop over the non-empty contiguous groups (float64 lands here; one host read of the
  counts, free on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.kernels import cpu

GATHER_MAX_ROWS = 4
CPU_GROUPED_MM_MIN_ROWS = 64
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> bool:
    """grouped_mm wants 16-byte aligned data, one unit-stride dimension and 16-byte multiples for
    every other stride (an expanded, stride-0 operand or a second unit stride is refused)."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    strides = t.stride()
    return (strides.count(1) == 1 and strides.index(1) >= t.dim() - 2  # the unit stride in a matrix
            and all(s == 1 or (s > 0 and (s * size) % 16 == 0) for s in strides))


def grouped_mm_supported(x_SI: Tensor, w_EOI: Tensor) -> bool:
    """True when ``torch.nn.functional.grouped_mm`` can run these operands here."""
    if not hasattr(F, "grouped_mm") or x_SI.dtype not in _GROUPED_MM_DTYPES or w_EOI.dtype != x_SI.dtype:
        return False
    if x_SI.device.type == "cuda" and torch.cuda.get_device_capability(x_SI.device) < (8, 0):
        return False
    # The output rows (and the backward's gradient rows) must be 16-byte multiples too.
    return _aligned(x_SI) and _aligned(w_EOI) and (w_EOI.shape[1] * x_SI.element_size()) % 16 == 0


def grouped_mm_loop(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """Loop over the non-empty groups only (one host read of the counts)."""
    counts = counts_E.tolist()
    if not torch.is_grad_enabled() or not (x_SI.requires_grad or w_EOI.requires_grad):
        out = x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])
        start = 0
        for expert, count in enumerate(counts):
            if count:
                torch.mm(x_SI[start : start + count], w_EOI[expert].T, out=out[start : start + count])
                start += count
        return out
    pieces = [x_SI.new_empty(0, w_EOI.shape[1])]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            pieces.append(x_SI[start : start + count] @ w_EOI[expert].T)
            start += count
    return pieces[1] if len(pieces) == 2 else torch.cat(pieces, dim=0)


def grouped_mm_gathered(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """Gather one weight matrix per row and batch-multiply; for a handful of rows."""
    num_rows = x_SI.shape[0]
    experts_S = torch.repeat_interleave(
        torch.arange(w_EOI.shape[0], device=x_SI.device), counts_E, output_size=num_rows
    )
    return torch.bmm(w_EOI[experts_S], x_SI.unsqueeze(-1)).squeeze(-1)


def grouped_mm_grouped(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """``y_SO[s] = x_SI[s] @ w_EOI[expert(s)].T`` with rows grouped by expert in order."""
    # With autograd, grouped_mm's backward writes the weight gradient once; the loop would build a
    # full-size gradient per group (the backward of ``w_EOI[expert]``).
    if cpu.applies(x_SI, w_EOI):
        return cpu.grouped_mm_cpu(x_SI, w_EOI, counts_E)
    needs_grad = torch.is_grad_enabled() and (x_SI.requires_grad or w_EOI.requires_grad)
    large = x_SI.device.type != "cpu" or x_SI.shape[0] >= CPU_GROUPED_MM_MIN_ROWS
    if not (large or needs_grad) and cpu.matvec_applies(x_SI, w_EOI):
        return cpu.grouped_mm_cpu(x_SI, w_EOI, counts_E)  # the loop, groups of <= 3 rows on OpenBLAS
    if (large or needs_grad) and grouped_mm_supported(x_SI, w_EOI):
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        return F.grouped_mm(x_SI, w_EOI.transpose(-2, -1), offs=offsets_E)
    if x_SI.device.type != "cpu" and x_SI.shape[0] <= GATHER_MAX_ROWS:
        return grouped_mm_gathered(x_SI, w_EOI, counts_E)
    return grouped_mm_loop(x_SI, w_EOI, counts_E)
