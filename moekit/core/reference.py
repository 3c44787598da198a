"""A plain dense reference of the MoE layer: the test oracle for every fast path (float64 friendly).

Every expert runs on every token; the output is masked and weighted by the routing, which is
recomputed here with straightforward code (Python loops for the capacity). Only the random draws of
training (noise, GShard's second-expert coin) are not redrawn: pass the layer's ``RoutingInfo`` and
the reference reuses its discrete choices, recomputing the weights differentiably.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.core.experts import ACT_FNS
from moekit.core.moe import MoE
from moekit.core.types import RoutingInfo


def reference_keep_mask(
    ids_TK: Tensor, priority_TK: Tensor | None, num_experts: int, capacity: int | None
) -> Tensor:
    """Capacity rule with Python loops: slots compete in priority order (default: choice-major)."""
    num_tokens, top_k = ids_TK.shape
    order = [(k, t) for k in range(top_k) for t in range(num_tokens)]
    if priority_TK is not None:
        order.sort(key=lambda kt: -float(priority_TK[kt[1], kt[0]]))
    used = [0] * num_experts
    kept = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    for k, t in order:
        expert = int(ids_TK[t, k])
        if expert >= 0 and (capacity is None or used[expert] < capacity):
            used[expert] += 1
            kept[t, k] = True
    return kept


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_route(
    moe: MoE, x_TD: Tensor, info: RoutingInfo | None = None, noise_seed: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute ``(weights_TK, ids_TK, logits_TE)``.

    In training, GShard's random second-expert choice is taken from ``info``; the noise of
    ``noisy_topk`` is redrawn with ``torch.manual_seed(noise_seed)`` as the layer did (its first draw).
    """
    config, gate = moe.config, moe.gate
    logits_TE = x_TD @ gate.weight.to(x_TD.dtype).T
    probs_TE = torch.softmax(logits_TE, dim=-1)
    router, k = config.router, config.top_k
    if router == "topk":
        weights_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
        if config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    elif router == "switch":
        weights_TK, ids_TK = probs_TE.max(-1, keepdim=True)
    elif router == "gshard":
        top_TK, ids_TK = torch.topk(probs_TE, 2, dim=-1)
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True)
        if moe.training:
            assert info is not None, "gshard in training needs the layer's RoutingInfo (random second expert)"
            second_T = info.expert_ids[:, 1] >= 0
            ids_TK = torch.stack([ids_TK[:, 0], torch.where(second_T, ids_TK[:, 1], -1)], -1)
            weights_TK = torch.stack([weights_TK[:, 0], weights_TK[:, 1] * second_T], -1)
    elif router == "noisy_topk":
        noisy_TE = logits_TE
        if moe.training:
            assert noise_seed is not None, "noisy_topk in training needs the seed of the layer's noise"
            std_TE = F.softplus(x_TD @ gate.noise_weight.to(x_TD.dtype).T)
            noise_TE = torch.randn(logits_TE.shape, dtype=logits_TE.dtype, generator=_seeded(noise_seed))
            noisy_TE = logits_TE + noise_TE * std_TE
        top_TK, ids_TK = torch.topk(noisy_TE, k, dim=-1)
        weights_TK = torch.softmax(top_TK, dim=-1)
    elif router == "expert_choice":
        capacity = config.capacity(x_TD.shape[0], moe.training)
        num_experts = config.num_experts
        ids_TK = torch.full((x_TD.shape[0], num_experts), -1, dtype=torch.long)
        for e in range(num_experts):
            column = probs_TE[:, e].tolist()
            for t in sorted(range(len(column)), key=lambda i: -column[i])[:capacity]:
                ids_TK[t, e] = e
        weights_TK = probs_TE * (ids_TK >= 0)
    elif router == "sigmoid_bias":
        scores_TE = torch.sigmoid(logits_TE)
        biased_TE = scores_TE + gate.e_score_correction_bias.to(scores_TE.dtype)
        size = config.num_experts // config.n_group
        if config.n_group > 1:  # group-limited: the experts outside a token's best groups drop out
            for t in range(biased_TE.shape[0]):
                row = biased_TE[t].tolist()
                group_score = [sum(sorted(row[g * size:(g + 1) * size])[-2:]) for g in range(config.n_group)]
                best = sorted(range(config.n_group), key=lambda g: -group_score[g])[:config.topk_group]
                for e in range(config.num_experts):
                    if e // size not in best:
                        biased_TE[t, e] = -math.inf
        _, ids_TK = torch.topk(biased_TE, k, dim=-1)
        weights_TK = scores_TE.gather(1, ids_TK)
        if config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    else:
        raise ValueError(f"reference_route: unknown router {router!r}")
    return weights_TK, ids_TK, logits_TE


def reference_expert(moe: MoE, x_TD: Tensor, expert: int) -> Tensor:
    """One routed expert applied to every token, ``(T, D)``."""
    experts = moe.experts
    act = ACT_FNS[moe.config.activation]
    h_TH = x_TD @ experts.in_proj[expert].to(x_TD.dtype).T
    if experts.gated:
        inter = moe.config.intermediate_size
        h_TH = act(h_TH[:, :inter]) * h_TH[:, inter:]
    else:
        h_TH = act(h_TH)
    return h_TH @ experts.down_proj[expert].to(x_TD.dtype).T


def reference_moe(
    moe: MoE, x: Tensor, info: RoutingInfo | None = None, noise_seed: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense reference output ``(..., D)``, with the ``ids_TK`` and ``kept_TK`` it used."""
    config = moe.config
    x_TD = x.reshape(-1, config.hidden_size)
    weights_TK, ids_TK, _ = reference_route(moe, x_TD, info, noise_seed)
    capacity = None if config.router == "expert_choice" else config.capacity(x_TD.shape[0], moe.training)
    kept_TK = reference_keep_mask(ids_TK, None, config.num_experts, capacity)
    dense_ETD = torch.stack([reference_expert(moe, x_TD, e) for e in range(config.num_experts)])
    y_TD = torch.zeros_like(x_TD)
    for k in range(ids_TK.shape[1]):
        rows_T = torch.arange(x_TD.shape[0])
        chosen_TD = dense_ETD[ids_TK[:, k].clamp_min(0), rows_T]
        y_TD = y_TD + (weights_TK[:, k] * kept_TK[:, k]).unsqueeze(-1).to(x_TD.dtype) * chosen_TD
    y_TD = y_TD * config.routed_scaling_factor
    if config.shared_expert_intermediate_size > 0:
        shared = moe.shared_expert
        h_TF = F.silu(x_TD @ shared.gate_proj.weight.T) * (x_TD @ shared.up_proj.weight.T)
        s_TD = h_TF @ shared.down_proj.weight.T
        if moe.shared_expert_gate is not None:
            s_TD = torch.sigmoid(x_TD @ moe.shared_expert_gate.weight.T) * s_TD
        y_TD = y_TD + s_TD
    return y_TD.reshape(x.shape), ids_TK, kept_TK


def switch_loss_reference(probs_TE: Tensor, ids_TK: Tensor) -> float:
    """``E * sum_e f_e P_e`` with Python sums (f over routed slots, P the mean probability)."""
    num_tokens, num_experts = probs_TE.shape
    slots = [int(e) for e in ids_TK.reshape(-1) if int(e) >= 0]
    f = [slots.count(e) / len(slots) for e in range(num_experts)]
    p = [float(probs_TE[:, e].sum()) / num_tokens for e in range(num_experts)]
    return num_experts * math.fsum(fe * pe for fe, pe in zip(f, p))
