"""What flows between the pieces of the sparse layer, and what the layer returns.

Shape legend used across ``moekit.core``:
    T  tokens (all leading dims flattened)     D  hidden size
    E  routed experts                          F  expert intermediate size
    K  experts per token (token choice)        S  slots = routed (token, expert) pairs
Tensors carry their shape as a suffix: ``x_TD``, ``ids_TK``, ``w_EFD``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor


@dataclass
class RouterOutput:
    """A router's decision for ``T`` tokens.

    Attributes:
        weights_TK: float32 combine weight of each chosen slot.
        ids_TK: int64 chosen expert of each slot; ``-1`` marks an unused slot (expert choice
            uses ``K = E`` with ``ids_TK[t, e] = e`` where expert ``e`` picked token ``t``, else -1).
        logits_TE: float32 router logits (before any noise / bias), for z-loss and analysis.
        probs_TE: float32 routing probabilities used by the balancing losses (softmax of the
            logits, or the sigmoid scores of ``sigmoid_bias``).
        losses: unweighted auxiliary losses computed by the router itself (e.g. Shazeer's
            ``importance`` and ``load``), keyed by name.
        priority_TK: optional float32; with a capacity, slots with a larger priority take an
            expert's capacity first (``None`` = choice order first, then token order).
        may_skip: True when ``ids_TK`` may hold ``-1`` (unused) slots; False lets the dropless
            dispatch skip building a keep mask (and a host sync).
    """

    weights_TK: Tensor
    ids_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    priority_TK: Tensor | None = None
    may_skip: bool = False


@dataclass
class RoutingInfo:
    """Routing information returned with the layer output.

    Attributes:
        aux_loss: 0-dim tensor, the auxiliary losses already weighted by the config's
            coefficients; add it to the task loss. 0 in inference (eval mode, no autograd).
        losses: unweighted losses by name (``load_balancing``, ``z``, ``importance``, ``load``);
            empty in inference (eval mode, no autograd), where nothing trains on them.
        tokens_per_expert: ``(E,)`` int64, slots each expert actually processed (after drops).
        dropped: 0-dim int64, number of routed slots dropped by the capacity (0 when dropless).
        router_logits: ``(T, E)`` float32 router logits.
        expert_ids: ``(T, K)`` int64 chosen experts (-1 = unused slot).
        expert_weights: ``(T, K)`` float32 combine weights.
        kept: ``(T, K)`` bool, False where a slot was dropped or unused.
    """

    aux_loss: Tensor
    losses: dict[str, Tensor]
    tokens_per_expert: Tensor
    dropped: Tensor
    router_logits: Tensor
    expert_ids: Tensor
    expert_weights: Tensor
    kept: Tensor


class MoEOutput(NamedTuple):
    """``y, info = moe(x)``: the output ``(..., D)`` (same shape as the input) and its routing."""

    output: Tensor
    routing: RoutingInfo
