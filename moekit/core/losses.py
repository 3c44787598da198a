"""Auxiliary router losses: pure functions of the router output (no global lists).

Normalisation of the Switch load-balancing loss (Fedus et al. 2021, eq. 4-6)::

    f_e = (routed slots of expert e) / (all routed slots)      # sums to 1 over experts
    P_e = mean over tokens of probs_TE[:, e]                   # sums to 1 over experts
    load_balancing = E * sum_e f_e * P_e

It equals 1.0 under perfectly uniform routing for any ``top_k``. transformers'
``load_balancing_loss_func`` divides the counts by the number of *tokens* instead of slots, so for
``top_k = K`` it returns ``K`` times this value (``moekit == transformers / K``). The counts are the
router's choices before any capacity drop (as in the paper), ignoring unused ``-1`` slots.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _fp(t: Tensor) -> Tensor:
    """float32, or float64 when already float64 (loss math never runs in bf16/fp16)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def expert_counts(ids_TK: Tensor, num_experts: int) -> Tensor:
    """float32 ``(E,)`` number of slots routed to each expert (``-1`` slots ignored); no host sync."""
    ids_S = ids_TK.reshape(-1)
    counts_E = torch.zeros(num_experts + 1, dtype=torch.float32, device=ids_S.device)
    # Unused slots (-1) land in the extra bin E, which is then cut off.
    bins_S = torch.where(ids_S < 0, num_experts, ids_S)
    counts_E.index_add_(0, bins_S, torch.ones_like(ids_S, dtype=torch.float32))
    return counts_E[:num_experts]


def load_balancing_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e`` (1.0 when uniform; see module doc).

    Args:
        probs_TE: ``(T, E)`` routing probabilities (gradient flows through these).
        counts_E: ``(E,)`` routed slots per expert (treated as constants); may be accumulated over
            micro-batches / ranks by :class:`BalanceStats` so that ``f`` covers the global batch.
    """
    num_experts = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    probs_TE = _fp(probs_TE)
    counts_E = counts_E.detach().to(probs_TE.dtype)
    fraction_E = counts_E / counts_E.sum().clamp_min(1.0)
    return num_experts * torch.dot(fraction_E, probs_TE.mean(dim=0))


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): ``mean_t logsumexp(logits_t)^2``."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(_fp(logits_TE), dim=-1).square().mean()


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var(v) / mean(v)^2`` (population variance); 0 for one entry."""
    v_E = _fp(v_E)
    if v_E.numel() <= 1:
        return v_E.new_zeros(())
    return v_E.var(unbiased=False) / (v_E.mean().square() + eps)


def noisy_topk_load(clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor, top_k: int) -> Tensor:
    """Shazeer et al. 2017 smooth load estimator ``load_e = sum_t P(e in top-k of t)``, ``(E,)``.

    ``P = Phi((clean - threshold) / noise_std)``, the threshold being the k-th largest noisy logit among
    the *other* experts: the (k+1)-th largest if ``e`` is currently in the top k, else the k-th.
    """
    num_experts = clean_TE.shape[-1]
    if top_k >= num_experts:
        return torch.ones_like(clean_TE).sum(0)
    top_TK1, _ = torch.topk(noisy_TE, top_k + 1, dim=-1)
    threshold_in_T1 = top_TK1[:, top_k : top_k + 1]
    threshold_out_T1 = top_TK1[:, top_k - 1 : top_k]
    is_in_TE = noisy_TE > threshold_in_T1
    std_TE = noise_std_TE.clamp_min(1e-9)
    prob_in_TE = torch.special.ndtr((clean_TE - threshold_in_T1) / std_TE)
    prob_out_TE = torch.special.ndtr((clean_TE - threshold_out_T1) / std_TE)
    return torch.where(is_in_TE, prob_in_TE, prob_out_TE).sum(0)


class BalanceStats:
    """Routed-slot counts accumulated over micro-batches (and ranks) for a global-batch balance loss.

    ``f`` in the Switch loss then covers every micro-batch seen since :meth:`reset` (all-reduced over the
    default process group when torch.distributed is initialised), while ``P`` stays the current
    micro-batch's probabilities, so each micro-batch's backward works as usual::

        moe.balance_stats = BalanceStats(config.num_experts)   # enable
        for micro_batch in batch: (loss(micro_batch) + info.aux_loss).backward()
        optimizer.step(); moe.balance_stats.reset()
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts_E: Tensor | None = None

    def add(self, counts_E: Tensor) -> Tensor:
        """Add one micro-batch's ``(E,)`` counts (all-reduced across ranks); returns the running total."""
        counts_E = counts_E.detach().float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_E)
        self.counts_E = counts_E if self.counts_E is None else self.counts_E.to(counts_E.device) + counts_E
        return self.counts_E

    def reset(self) -> None:
        """Forget the accumulated counts (call after each optimizer step)."""
        self.counts_E = None
