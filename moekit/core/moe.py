"""The sparse MoE layer: router -> dispatch -> grouped experts -> combine (+ shared expert).

    y, info = moe(x)          # x (..., D) -> y (..., D); info: RoutingInfo
    loss = task_loss + info.aux_loss

state_dict names match transformers' ``MixtralSparseMoeBlock`` (``gate.weight``,
``experts.gate_up_proj``, ``experts.down_proj``) and Qwen2-MoE's shared expert
(``shared_expert.{gate,up,down}_proj.weight``, ``shared_expert_gate.weight``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

from moekit.core.config import MoEConfig
from moekit.core.dispatch import Dispatcher
from moekit.core.experts import Experts, SharedExpert
from moekit.core.losses import BalanceStats, expert_counts, load_balancing_loss, z_loss
from moekit.core.router import SigmoidBiasRouter, build_router, router_dtype
from moekit.core.types import MoEOutput, RouterOutput, RoutingInfo
from moekit.kernels import group_padding

SLOT_PATH_MAX_SLOTS = 8


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` if it is on (e.g. for the float32 router), else nothing."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer configured by :class:`MoEConfig`.

    Attributes:
        gate: the router (``gate.weight (E, D)``).
        experts: stacked routed experts (:class:`~moekit.core.experts.Experts`).
        dispatcher: any object with ``dispatch`` / ``combine`` (replaceable, e.g. expert parallel).
        shared_expert, shared_expert_gate: present when ``shared_expert_intermediate_size > 0``.
        balance_stats: ``None``, or a :class:`~moekit.core.losses.BalanceStats` to compute the
            load-balancing loss over all micro-batches (and ranks) since its last ``reset()``.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoE(config) needs a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.gate = build_router(config)
        self.experts = Experts(config)
        self.dispatcher = Dispatcher(config.num_experts, functools.partial(group_padding, config.backend))
        self.balance_stats: BalanceStats | None = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SharedExpert(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = (
                nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
            )

    def forward(self, x: Tensor) -> MoEOutput:
        """Route, compute and combine.

        Args:
            x: ``(..., D)`` floating-point hidden states, any leading shape (zero tokens allowed).

        Returns:
            ``MoEOutput(output, routing)``: ``output`` has the shape and dtype of ``x``;
            ``routing`` is a :class:`RoutingInfo` over the ``T = x.numel() // D`` flattened tokens.
            In eval mode without autograd (inference) the loss math is skipped:
            ``routing.losses == {}`` and ``routing.aux_loss == 0``.
        """
        config = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoE input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != config.hidden_size:
            raise ValueError(
                f"MoE input last dim must equal hidden_size={config.hidden_size}, got shape {tuple(x.shape)}"
            )
        weight_dtype = self.experts.down_proj.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"MoE input dtype {x.dtype} differs from the layer's weights ({weight_dtype}); cast one "
                f"to the other (moe.to({x.dtype}) or x.to({weight_dtype})), or run under torch.autocast"
            )
        x_TD = x.reshape(-1, config.hidden_size).contiguous()  # a no-op unless x is a strided view
        num_tokens = x_TD.shape[0]
        # A collective (expert-parallel) dispatcher must join its peers' exchange even with no tokens.
        if num_tokens == 0 and not getattr(self.dispatcher, "collective", False):
            if self.balance_stats is not None and self.training:  # its all-reduce: join the peers'
                self.balance_stats.add(torch.zeros(config.num_experts, device=x.device))
            # Empty, but still on the autograd graph, so a backward over an empty batch works.
            return MoEOutput(x * 0, self._empty_info(x))

        with _without_autocast(x_TD.device):  # the router stays float32 under torch.autocast
            routing = self.gate(x_TD)
        capacity = None if config.router == "expert_choice" else config.capacity(num_tokens, self.training)
        if self._use_slot_path(routing, capacity):
            y_TD = self.experts.forward_slots(x_TD, routing.ids_TK, routing.weights_TK)
            kept_TK = torch.ones_like(routing.ids_TK, dtype=torch.bool)
            counts_E = torch.bincount(routing.ids_TK.reshape(-1), minlength=config.num_experts)
            dropped = torch.zeros((), dtype=torch.long)
        else:
            x_SD, counts_E, meta = self.dispatcher.dispatch(x_TD, routing, capacity)
            y_SD = self.experts(x_SD, counts_E)
            y_TD = self.dispatcher.combine(y_SD, routing.weights_TK, meta)
            # meta.counts_E: (E,) this rank's computed slots per global expert, also under expert parallelism.
            kept_TK, counts_E, dropped = meta.kept_TK, meta.counts_E, None
        if config.routed_scaling_factor != 1.0:
            y_TD = y_TD * config.routed_scaling_factor
        if config.shared_expert_intermediate_size > 0:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        info = self._routing_info(routing, kept_TK, counts_E, dropped)
        y = y_TD.reshape(x.shape)
        return MoEOutput(y if y.dtype == x.dtype else y.to(x.dtype), info)

    def _use_slot_path(self, routing: RouterOutput, capacity: int | None) -> bool:
        """Small CPU inference batches (decode steps) skip sort/dispatch: see ``Experts.forward_slots``.

        Only without autograd and in eval mode (no losses are computed then either); with autograd the
        grouped path is better: one weight-gradient write instead of one per slot.
        """
        return (
            not self.training
            and not torch.is_grad_enabled()
            and routing.ids_TK.numel() <= SLOT_PATH_MAX_SLOTS
            and routing.ids_TK.device.type == "cpu"
            and capacity is None
            and not routing.may_skip
            and self.config.backend == "grouped"
            and type(self.dispatcher) is Dispatcher
        )

    def _routing_info(
        self, routing: RouterOutput, kept_TK: Tensor, counts_E: Tensor, dropped: Tensor | None = None
    ) -> RoutingInfo:
        config = self.config
        if dropped is None:
            num_routed = (routing.ids_TK >= 0).sum() if routing.may_skip else routing.ids_TK.numel()
            dropped = num_routed - counts_E.sum()
        if not self.training and not torch.is_grad_enabled():
            # Inference: no losses to train on; skip their cost (moekit.core.losses computes them
            # from router_logits when wanted).
            zero = torch.zeros((), device=counts_E.device)
            return RoutingInfo(zero, {}, counts_E, dropped, routing.logits_TE, routing.ids_TK,
                               routing.weights_TK, kept_TK)
        routed_E = expert_counts(routing.ids_TK, config.num_experts)
        if self.balance_stats is not None and self.training:
            routed_E = self.balance_stats.add(routed_E)
        losses = {"load_balancing": load_balancing_loss(routing.probs_TE, routed_E),
                  "z": z_loss(routing.logits_TE)}
        losses.update(routing.losses)
        aux_loss = config.router_z_loss_coef * losses["z"]
        if config.router == "noisy_topk":
            aux_loss = aux_loss + config.router_aux_loss_coef * (losses["importance"] + losses["load"])
        elif config.router != "expert_choice":  # there every expert takes C slots: the loss is 1, no gradient
            aux_loss = aux_loss + config.router_aux_loss_coef * losses["load_balancing"]
        return RoutingInfo(
            aux_loss=aux_loss,
            losses=losses,
            tokens_per_expert=counts_E,
            dropped=dropped,
            router_logits=routing.logits_TE,
            expert_ids=routing.ids_TK,
            expert_weights=routing.weights_TK,
            kept=kept_TK,
        )

    def _empty_info(self, x: Tensor) -> RoutingInfo:
        num_experts = self.config.num_experts
        top_k = num_experts if self.config.router == "expert_choice" else self.config.top_k
        dtype = router_dtype(x.dtype)
        zero = self.gate.weight.sum().to(dtype) * 0  # on the graph: backward over no tokens works
        names = ["load_balancing", "z"]
        if self.config.router == "noisy_topk":
            names += ["importance", "load"]
        inference = not self.training and not torch.is_grad_enabled()  # as _routing_info: no losses
        return RoutingInfo(
            aux_loss=zero,
            losses={} if inference else dict.fromkeys(names, zero),
            tokens_per_expert=torch.zeros(num_experts, dtype=torch.long, device=x.device),
            dropped=torch.zeros((), dtype=torch.long, device=x.device),
            router_logits=torch.zeros(0, num_experts, dtype=dtype, device=x.device),
            expert_ids=torch.zeros(0, top_k, dtype=torch.long, device=x.device),
            expert_weights=torch.zeros(0, top_k, dtype=dtype, device=x.device),
            kept=torch.zeros(0, top_k, dtype=torch.bool, device=x.device),
        )

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """``sigmoid_bias`` router: apply the aux-loss-free bias update from the load counted since the
        last call; call once after each ``optimizer.step()``. Returns the ``(E,)`` load used."""
        if not isinstance(self.gate, SigmoidBiasRouter):
            raise ValueError(f"update_bias needs router='sigmoid_bias', got router={self.config.router!r}")
        return self.gate.update_bias()

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, top_k={c.top_k}, capacity_factor={c.capacity_factor}, backend={c.backend}"
