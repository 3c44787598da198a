"""The reference grouped matmul: a plain loop over experts. Slow, obvious, any dtype; the oracle."""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_mm_reference(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """``y_SO[s] = x_SI[s] @ w_EOI[expert(s)].T`` with rows grouped by expert in order.

    Loops over all ``E`` experts (empty ones included) and concatenates the results.
    """
    num_experts, out_features, _ = w_EOI.shape
    assert counts_E.shape == (num_experts,), "counts_E must have one entry per expert"
    pieces = [x_SI.new_empty(0, out_features)]
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        rows = x_SI[start : start + count]
        pieces.append(rows @ w_EOI[expert].to(x_SI.dtype).T)
        start += count
    assert start == x_SI.shape[0], "counts_E must sum to the number of rows"
    return torch.cat(pieces, dim=0)
