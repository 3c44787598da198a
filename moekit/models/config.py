"""ModelConfig: the frozen dataclass of a decoder-only MoE language model, and its presets.

Field names follow Hugging Face configs (Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE), so a ``config.json`` maps
onto it field by field. ``PRESETS`` holds the named configurations; ``get_preset`` builds one with
overrides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moekit.core.config import ROUTERS, MoEConfig

QK_NORMS = (None, "full", "head")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"ModelConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"ModelConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"ModelConfig.{name} must be finite, got {value!r}")
    if (positive and not value > 0) or (not positive and value < 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"ModelConfig.{name} must be {kind}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Configuration of :class:`moekit.models.MoEForCausalLM`.

    Attributes:
        vocab_size: number of token ids ``V``.
        hidden_size: model width ``D``.
        num_hidden_layers: number of decoder blocks ``L``.
        num_attention_heads: query heads ``H``.
        num_key_value_heads: key/value heads ``KV`` (grouped-query attention; ``H % KV == 0``).
        head_dim: width of one head; ``None`` means ``hidden_size // num_attention_heads``.
        max_position_embeddings: context length (the largest KV cache).
        rope_theta: base of the rotary position embedding (Mixtral: 1e6).
        rms_norm_eps: epsilon of every RMSNorm.
        sliding_window: attend only to the last ``sliding_window`` positions (self included);
            ``None`` = full causal attention.
        attention_bias: bias on q/k/v projections (Qwen2-MoE).
        qk_norm: RMSNorm on the queries and keys before RoPE: ``None`` (off), ``"full"`` over the
            whole q_proj / k_proj outputs (OLMoE; ``True`` means this) or ``"head"`` over each head's
            ``head_dim`` values with one weight shared by the heads (Qwen3-MoE).
        tie_word_embeddings: the output head shares the embedding matrix.
        intermediate_size: width of the dense SwiGLU FFN of non-MoE layers.
        moe_intermediate_size: width of each routed expert.
        num_experts: routed experts per MoE layer; 0 makes every layer dense.
        top_k: experts per token.
        router, norm_topk_prob, capacity_factor, router_aux_loss_coef, router_z_loss_coef,
        router_jitter_noise, bias_update_rate, shared_expert_intermediate_size, shared_expert_gate:
            passed to :class:`moekit.MoEConfig` (see there); ``moe_backend`` is its ``backend``.
        decoder_sparse_step: layer ``i`` is MoE iff ``(i + 1) % decoder_sparse_step == 0``
            (1 = every layer, 2 = GShard's every other layer; HF Qwen2-MoE semantics).
        first_k_dense_replace: the first ``k`` layers are dense (DeepSeek).
        mlp_only_layers: indices of layers forced dense.
        initializer_range: std of the normal init of linear and embedding weights.
        bos_token_id, eos_token_id, pad_token_id: special token ids or ``None``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    attention_bias: bool = False
    qk_norm: str | None = None
    tie_word_embeddings: bool = False
    intermediate_size: int
    moe_intermediate_size: int | None = None
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    norm_topk_prob: bool = True
    capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    bias_update_rate: float = 1e-3
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    decoder_sparse_step: int = 1
    first_k_dense_replace: int = 0
    mlp_only_layers: tuple[int, ...] = ()
    moe_backend: str = "grouped"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "intermediate_size",
            "decoder_sparse_step",
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_experts", "first_k_dense_replace", "shared_expert_intermediate_size"):
            _check_int(name, getattr(self, name), 0)
        for name in ("attention_bias", "tie_word_embeddings", "norm_topk_prob", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.qk_norm, bool):  # the boolean form (and run.json files before "head" existed)
            object.__setattr__(self, "qk_norm", "full" if self.qk_norm else None)
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"ModelConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelConfig.head_dim is None, so hidden_size ({self.hidden_size}) must be a multiple "
                    f"of num_attention_heads ({self.num_attention_heads}); or give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check_int("head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (rotary embedding), got {self.head_dim}")
        if self.moe_intermediate_size is None:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        _check_int("moe_intermediate_size", self.moe_intermediate_size, 1)
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1)
        _check_float("rope_theta", self.rope_theta, positive=True)
        _check_float("rms_norm_eps", self.rms_norm_eps, positive=True)
        _check_float("initializer_range", self.initializer_range, positive=True)
        if self.num_experts > 0:
            _check_int("top_k", self.top_k, 1)
            if self.top_k > self.num_experts:
                raise ValueError(
                    f"ModelConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}"
                )
        if self.router not in ROUTERS:
            raise ValueError(f"ModelConfig.router must be one of {ROUTERS}, got {self.router!r}")
        from moekit.kernels import available_backends

        if self.moe_backend not in available_backends():
            raise ValueError(f"ModelConfig.moe_backend must be one of {available_backends()} (or a name "
                             f"given to moekit.kernels.register_backend), got {self.moe_backend!r}")
        if not isinstance(self.mlp_only_layers, (tuple, list)):
            raise ValueError(
                f"ModelConfig.mlp_only_layers must be a tuple of ints, got {self.mlp_only_layers!r}"
            )
        layers = tuple(self.mlp_only_layers)
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_hidden_layers:
                raise ValueError(
                    "ModelConfig.mlp_only_layers entries must be layer indices in "
                    f"[0, {self.num_hidden_layers}), "
                    f"got {i!r}"
                )
        object.__setattr__(self, "mlp_only_layers", layers)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size
            ):
                raise ValueError(
                    f"ModelConfig.{name} must be None or an int in [0, vocab_size={self.vocab_size}), "
                    f"got {value!r}"
                )
        if self.num_experts > 0:  # (even if every layer is dense: the fields must still make sense)
            self.moe_config()  # validates the MoE fields (router/top_k/capacity...) with MoEConfig's messages

    @property
    def experts_per_token(self) -> float:
        """Routed experts one token uses: ``top_k``, or for ``expert_choice`` (each expert takes
        ``T * capacity_factor / E`` tokens) ``capacity_factor`` (default 1.0) on average."""
        if self.router == "expert_choice":
            return min(float(self.num_experts), 1.0 if self.capacity_factor is None else self.capacity_factor)
        return float(self.top_k)

    def inactive_expert_parameters(self, expert_params: int) -> int:
        """Of one MoE layer's ``expert_params`` routed-expert parameters, those a token does not
        touch: the ``num_experts - experts_per_token`` experts it does not use."""
        return round(expert_params / self.num_experts * (self.num_experts - self.experts_per_token))

    def is_moe_layer(self, i: int) -> bool:
        """True when layer ``i`` has a sparse MoE feed-forward, False for a dense SwiGLU FFN."""
        return (
            self.num_experts > 0
            and i >= self.first_k_dense_replace
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def moe_config(self) -> MoEConfig:
        """The :class:`moekit.MoEConfig` of every MoE layer of this model."""
        return MoEConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            top_k=self.top_k,
            router=self.router,
            norm_topk_prob=self.norm_topk_prob,
            capacity_factor=self.capacity_factor,
            router_aux_loss_coef=self.router_aux_loss_coef,
            router_z_loss_coef=self.router_z_loss_coef,
            router_jitter_noise=self.router_jitter_noise,
            bias_update_rate=self.bias_update_rate,
            activation="swiglu",
            shared_expert_intermediate_size=self.shared_expert_intermediate_size,
            shared_expert_gate=self.shared_expert_gate,
            backend=self.moe_backend,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again).

        Derived fields follow their source: ``head_dim`` (when it was ``hidden_size // heads``) is
        recomputed if ``hidden_size`` or ``num_attention_heads`` change, and ``moe_intermediate_size``
        (when equal to ``intermediate_size``) follows ``intermediate_size``, unless given too.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {unknown}")
        changes = dict(changes)
        derived_head_dim = self.head_dim == self.hidden_size // self.num_attention_heads
        width_changed = "hidden_size" in changes or "num_attention_heads" in changes
        if width_changed and "head_dim" not in changes and derived_head_dim:
            changes["head_dim"] = None
        derived_moe = self.moe_intermediate_size == self.intermediate_size
        if "intermediate_size" in changes and "moe_intermediate_size" not in changes and derived_moe:
            changes["moe_intermediate_size"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``ModelConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig key(s): {unknown}; allowed: {sorted(names)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in d
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"ModelConfig.from_dict: missing required key(s): {missing}")
        d = dict(d)
        if isinstance(d.get("mlp_only_layers"), list):
            d["mlp_only_layers"] = tuple(d["mlp_only_layers"])
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # CPU default: seconds per training step on 2 cores. Same shape as the speed config.
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        intermediate_size=512,
        num_experts=8,
        top_k=2,
    ),
    "small": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        intermediate_size=1024,
        num_experts=8,
        top_k=2,
    ),
    # Mixtral of Experts (Jiang et al. 2024), Table 1; untied head, 46.7B total / 12.9B active.
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        intermediate_size=14336,
        num_experts=8,
        top_k=2,
        router_aux_loss_coef=0.02,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied; unknown name -> ValueError listing presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
