"""Routers: hidden states -> which experts each token goes to, and with what weight.

Every router is a small ``nn.Module`` whose ``weight (E, D)`` is the gate (state_dict ``gate.weight``,
as in transformers' Mixtral). Whatever the model dtype, the router math runs in float32 (selective
precision): the logits are computed from ``x`` and ``weight`` cast to float32 (float64 stays float64,
which the float64 reference tests rely on).

Shapes (see ``moekit.core.types``): ``x_TD`` in, :class:`RouterOutput` out with ``weights_TK``,
``ids_TK`` (``-1`` = unused slot), ``logits_TE``, ``probs_TE``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.config import MoEConfig
from moekit.core.losses import cv_squared, noisy_topk_load
from moekit.core.types import RouterOutput
from moekit.kernels import linear


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the router math: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Router(nn.Module):
    """Base class: a linear gate ``logits = x @ weight.T`` in float32, optional input jitter.

    Subclasses implement ``forward(x_TD) -> RouterOutput``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x_TD: Tensor) -> Tensor:
        """float32 router logits ``(T, E)``; Switch-style multiplicative jitter on the input in training."""
        dtype = router_dtype(x_TD.dtype)
        if x_TD.dtype != dtype:
            x_TD = x_TD.to(dtype)
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        weight = self.weight
        return linear(x_TD, weight if weight.dtype == dtype else weight.to(dtype))


class TopKRouter(Router):
    """Softmax over all ``E`` experts, keep the top ``K``; renormalise them if ``norm_topk_prob``
    (Mixtral: yes; Qwen2-MoE / OLMoE: no)."""

    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.norm_topk_prob:
            # softmax over all E then renormalising the top K == softmax over the top-K logits
            top_TK, ids_TK = torch.topk(logits_TE, self.top_k, dim=-1)
            weights_TK = torch.softmax(top_TK, dim=-1)
        else:
            weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE)


class SwitchRouter(Router):
    """Switch Transformer (Fedus et al. 2021): top-1, the output is scaled by the raw softmax probability
    (``norm_topk_prob`` is ignored: renormalising a single weight to 1 would cut the router's gradient)."""

    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, ids_TK = torch.max(probs_TE, dim=-1, keepdim=True)
        return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE)


class GShardRouter(Router):
    """GShard top-2 (Lepikhin et al. 2020): weights ``g1, g2`` renormalised over the two; in training the
    second expert is kept only with probability ``min(1, 2 * g2)``. With a capacity, all first choices
    take capacity before any second choice (the default slot priority)."""

    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, 2, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.training:
            keep_T = torch.rand_like(weights_TK[:, 1]) < 2.0 * weights_TK[:, 1].detach()
            ids_TK = torch.stack([ids_TK[:, 0], torch.where(keep_T, ids_TK[:, 1], -1)], dim=-1)
            weights_TK = torch.stack([weights_TK[:, 0], weights_TK[:, 1] * keep_T], dim=-1)
        return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE, may_skip=self.training)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017).

    ``H = x W_g + N(0, 1) * softplus(x W_noise)`` in training (no noise in eval), keep the top ``K``
    of ``H`` and softmax over them. Adds the unweighted ``importance`` and ``load`` losses (CV^2 of the
    per-expert gate sums and of the smooth normal-CDF load estimator) to ``RouterOutput.losses``.
    ``W_noise`` is ``gate.noise_weight (E, D)``, zero-initialised as in the paper's code.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        dtype = logits_TE.dtype
        noise_std_TE = F.softplus(linear(x_TD.to(dtype), self.noise_weight.to(dtype)))
        noisy_TE = logits_TE
        if self.training:
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        top_TK, ids_TK = torch.topk(noisy_TE, self.top_k, dim=-1)
        weights_TK = torch.softmax(top_TK, dim=-1)
        gates_TE = torch.zeros_like(logits_TE).scatter(1, ids_TK, weights_TK)
        load_E = noisy_topk_load(logits_TE, noisy_TE, noise_std_TE, self.top_k)
        losses = {"importance": cv_squared(gates_TE.sum(0)), "load": cv_squared(load_E)}
        return RouterOutput(weights_TK, ids_TK, logits_TE, torch.softmax(logits_TE, dim=-1), losses)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-``C`` tokens by softmax score
    (the earlier token on ties), ``C = ceil(T * capacity_factor / E)`` (``MoEConfig.capacity``). A
    token may get 0..E experts.

    Non-causal: a token's routing depends on the other tokens of the batch (later ones included), so
    it is not suitable for autoregressive decoding. Output uses ``K = E`` slots per token:
    ``ids_TK[t, e] = e`` where expert ``e`` picked token ``t``, else ``-1``.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.config = config

    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        capacity = self.config.capacity(x_TD.shape[0], self.training)
        assert capacity is not None
        capacity = min(capacity, x_TD.shape[0])
        # Ties (e.g. one expert: every score is 1) go to the earlier token, as in the reference;
        # torch.topk leaves their order unspecified.
        tokens_EC = torch.sort(probs_TE.T, dim=-1, descending=True, stable=True).indices[:, :capacity]
        picked_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        picked_TE[tokens_EC, torch.arange(self.num_experts, device=x_TD.device)[:, None]] = True
        experts_E = torch.arange(self.num_experts, device=x_TD.device)
        ids_TK = torch.where(picked_TE, experts_E, -1)
        weights_TK = probs_TE * picked_TE
        return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE, may_skip=True)


class SigmoidBiasRouter(Router):
    """DeepSeek-V3 style: sigmoid scores, aux-loss-free balancing bias.

    ``scores = sigmoid(logits)``; the experts are chosen by ``topk(scores + bias)`` but weighted by the
    unbiased ``scores`` (renormalised over the K if ``norm_topk_prob``). With ``n_group > 1`` the
    choice is group-limited: only the experts of the token's ``topk_group`` best groups (by the sum
    of each group's two largest ``scores + bias``) compete. The bias buffer
    ``e_score_correction_bias (E,)`` only changes *which* experts are chosen. It moves by
    ``bias += gamma * sign(mean_load - load)`` when :meth:`update_bias` is called, using the load counted
    in training forwards since the previous call (all-reduced when torch.distributed is initialised)::

        loss.backward(); optimizer.step(); moe.update_bias()   # once per optimizer step
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.gamma = config.bias_update_rate
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        # (E,) slots chosen in training forwards since update_bias: a plain attribute, not a buffer,
        # so DistributedDataParallel (which copies rank 0's buffers before each forward) leaves each
        # rank's own count alone until update_bias all-reduces them.
        self.load_counts: Tensor | None = None

    def _apply(self, fn, recurse=True):
        # Model-wide dtype casts (``.to(torch.bfloat16)``) must not round the bias: increments of
        # ``gamma`` ~ 1e-3 vanish in bf16. Keep it float32, follow only the device.
        before = self.e_score_correction_bias
        super()._apply(fn, recurse)
        after = self.e_score_correction_bias
        source = after if before.is_meta else before  # to_empty() from meta: take the new storage
        self.e_score_correction_bias = source.to(device=after.device, dtype=torch.float32)
        return self

    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        biased_TE = scores_TE.detach() + self.e_score_correction_bias.to(scores_TE.dtype)
        if self.n_group > 1:
            T, G = biased_TE.shape[0], self.n_group
            group_TG = biased_TE.view(T, G, self.num_experts // G).topk(2, dim=-1).values.sum(-1)
            best_TG = torch.zeros_like(group_TG, dtype=torch.bool)
            best_TG.scatter_(1, group_TG.topk(self.topk_group, dim=-1).indices, True)
            biased_TE = biased_TE.masked_fill(~best_TG.repeat_interleave(self.num_experts // G, 1), -math.inf)
        _, ids_TK = torch.topk(biased_TE, self.top_k, dim=-1)
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:  # at K = 1 the weight is 1 (as transformers' DeepSeek-V3 router)
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            with torch.no_grad():
                load_E = torch.bincount(ids_TK.flatten(), minlength=self.num_experts).float()
                counts = self.load_counts
                self.load_counts = load_E if counts is None else counts.to(load_E) + load_E
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE)

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """Apply ``bias += gamma * sign(mean_load - load)`` and reset the counts; returns the load used."""
        bias = self.e_score_correction_bias
        load_E = torch.zeros_like(bias) if self.load_counts is None else self.load_counts.to(bias)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E)
        bias += self.gamma * torch.sign(load_E.mean() - load_E)
        self.load_counts = None
        return load_E


ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "expert_choice": ExpertChoiceRouter,
    "sigmoid_bias": SigmoidBiasRouter,
}


def build_router(config: MoEConfig) -> Router:
    """The router named by ``config.router``."""
    return ROUTER_CLASSES[config.router](config)
