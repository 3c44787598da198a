"""MoEConfig: the one frozen dataclass that configures a sparse MoE layer.

Names follow Hugging Face configs where a name exists there (``num_experts``, ``top_k``,
``norm_topk_prob``, ``router_aux_loss_coef``, ``router_z_loss_coef``, ``router_jitter_noise``,
``intermediate_size``), so a Mixtral / Qwen2-MoE / OLMoE ``config.json`` maps onto it directly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction


def _is_number(value: object) -> bool:
    """A real number (NumPy scalars included), not a bool (``True`` is an int in Python)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


ROUTERS = ("topk", "noisy_topk", "switch", "gshard", "expert_choice", "sigmoid_bias")
BACKENDS = ("reference", "grouped")
# Gated activations use a fused ``gate_up_proj (E, 2F, D)``; plain ones an ``up_proj (E, F, D)``.
GATED_ACTIVATIONS = ("swiglu", "geglu")
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
ACTIVATIONS = GATED_ACTIVATIONS + PLAIN_ACTIVATIONS


def _decimal(x: float) -> Fraction:
    """``x`` as the decimal it is written as (1.1 -> 11/10), so that a ceiling of a product is exact:
    in binary floating point ``1.1 * 100 / 10`` is 11.000000000000002, whose ceiling is 12."""
    return Fraction(repr(float(x)))


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Configuration of :class:`moekit.MoE`.

    Attributes:
        hidden_size: model width ``D``; the layer maps ``(..., D) -> (..., D)``.
        intermediate_size: width ``F`` of each routed expert's hidden layer.
        num_experts: number of routed experts ``E``.
        top_k: experts per token ``K`` for token-choice routers (``switch`` needs 1, ``gshard`` 2;
            ignored by ``expert_choice``).
        router: one of ``ROUTERS`` (see README's routers table).
        norm_topk_prob: renormalise the K chosen softmax weights to sum to 1 (Mixtral: True;
            Qwen2-MoE / OLMoE: False).
        capacity_factor: ``None`` = dropless (default). Otherwise each expert takes at most
            ``ceil(capacity_factor * T * K / E)`` slots in training; overflow slots are dropped.
            ``expert_choice`` uses it as ``C = T * capacity_factor / E`` (default 1.0 there).
        eval_capacity_factor: capacity factor in eval mode; ``None`` means "same as training".
        router_aux_loss_coef: weight of the load-balancing loss (Switch / Shazeer importance+load)
            in ``RoutingInfo.aux_loss``.
        router_z_loss_coef: weight of the router z-loss (ST-MoE) in ``RoutingInfo.aux_loss``.
        router_jitter_noise: multiplicative uniform jitter ``x * U(1-eps, 1+eps)`` on the router
            input in training (Switch); 0 disables it.
        activation: expert activation, one of ``ACTIVATIONS``; ``swiglu`` is Mixtral's expert.
        shared_expert_intermediate_size: width of a dense shared expert added to every token's
            output (Qwen2-MoE / DeepSeek); 0 = no shared expert.
        shared_expert_gate: scale the shared expert by ``sigmoid(x @ w)`` (Qwen2-MoE).
        routed_scaling_factor: multiplier on the routed experts' combined output (DeepSeek-V3).
        bias_update_rate: ``gamma`` of the ``sigmoid_bias`` router's aux-loss-free balancing.
        n_group, topk_group: group-limited routing of ``sigmoid_bias`` (DeepSeek-V3's names): the
            experts form ``n_group`` groups of consecutive ids, each token keeps the ``topk_group``
            groups with the largest sum of their two best biased scores and takes its top ``K``
            experts from those. ``n_group=1`` (default) routes over all experts.
        backend: grouped-matmul backend behind the experts' seam: one of ``BACKENDS`` or a name
            registered with :func:`moekit.kernels.register_backend`.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    norm_topk_prob: bool = True
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    activation: str = "swiglu"
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    n_group: int = 1
    topk_group: int = 1
    backend: str = "grouped"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        from moekit.kernels import available_backends  # the built-in BACKENDS and registered ones

        if self.backend not in available_backends():
            raise ValueError(f"MoEConfig.backend must be one of {available_backends()} (or a name given "
                             f"to moekit.kernels.register_backend), got {self.backend!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"MoEConfig.top_k must be an int >= 1, got {self.top_k!r}")
        if self.top_k > self.num_experts and self.router != "expert_choice":  # (it ignores top_k)
            raise ValueError(
                f"MoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"MoEConfig.top_k must be 1 for router='switch', got {self.top_k}")
        if self.router == "gshard" and self.top_k != 2:
            raise ValueError(f"MoEConfig.top_k must be 2 for router='gshard', got {self.top_k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(
                    f"MoEConfig.{name} must be a finite number > 0 or None (dropless), got {value!r}"
                )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "bias_update_rate"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value < math.inf):
                raise ValueError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (_is_number(self.routed_scaling_factor) and 0 < self.routed_scaling_factor < math.inf):
            value = self.routed_scaling_factor
            raise ValueError(f"MoEConfig.routed_scaling_factor must be a finite number > 0, got {value!r}")
        if self.router_jitter_noise >= 1:
            raise ValueError(f"MoEConfig.router_jitter_noise must be < 1, got {self.router_jitter_noise!r}")
        for name in ("norm_topk_prob", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be True or False, got {getattr(self, name)!r}")
        size = self.shared_expert_intermediate_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(
                f"MoEConfig.shared_expert_intermediate_size must be an int >= 0 (0 = none), got {size!r}"
            )
        if self.shared_expert_gate and self.shared_expert_intermediate_size == 0:
            raise ValueError("MoEConfig.shared_expert_gate needs shared_expert_intermediate_size > 0")
        self._check_groups()

    def _check_groups(self) -> None:
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be an int >= 1, got {value!r}")
        if self.n_group == 1:
            if self.topk_group != 1:
                raise ValueError(
                    f"MoEConfig.topk_group must be 1 without groups (n_group=1), got {self.topk_group}"
                )
            return
        if self.router != "sigmoid_bias":
            raise ValueError(f"MoEConfig.n_group > 1 (group-limited routing) needs router='sigmoid_bias', "
                             f"got {self.router!r}")
        size = self.num_experts // self.n_group
        if self.num_experts % self.n_group or size < 2:
            raise ValueError(f"MoEConfig.n_group must divide num_experts ({self.num_experts}) into groups of "
                             f">= 2 experts, got {self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(
                f"MoEConfig.topk_group must be <= n_group ({self.n_group}), got {self.topk_group}"
            )
        if self.top_k > self.topk_group * size:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= topk_group * experts per group "
                             f"({self.topk_group} * {size})")

    @property
    def gated(self) -> bool:
        """True for GLU experts (``gate_up_proj``), False for plain MLP experts (``up_proj``)."""
        return self.activation in GATED_ACTIVATIONS

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Slots each expert may take for ``num_tokens`` tokens, or ``None`` when dropless."""
        factor = self.capacity_factor
        if not training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if self.router == "expert_choice":
            factor = 1.0 if factor is None else factor
            return max(1, min(num_tokens, math.ceil(_decimal(factor) * num_tokens / self.num_experts)))
        if factor is None:
            return None
        return max(1, math.ceil(_decimal(factor) * num_tokens * self.top_k / self.num_experts))
