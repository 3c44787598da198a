"""``describe(config)``: parameters (total / active per token), per-layer breakdown, memory, FLOPs.

Counts come from the real module tree built on the meta device (no memory is allocated), so they
always agree with :meth:`MoEForCausalLM.num_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.models.config import ModelConfig
from moekit.models.model import MoEForCausalLM


@dataclass(frozen=True)
class LayerCount:
    """Parameters of one decoder layer: attention, feed-forward (all and active), norms."""

    kind: str
    attention: int
    ffn: int
    ffn_active: int
    norms: int

    @property
    def total(self) -> int:
        return self.attention + self.ffn + self.norms

    @property
    def active(self) -> int:
        return self.attention + self.ffn_active + self.norms


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_counts(config: ModelConfig) -> tuple[list[LayerCount], dict[str, int], MoEForCausalLM]:
    """Per-layer counts, the other parameters (embedding, head, final_norm) and the meta-device model."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    rows = []
    for layer in model.model.layers:
        ffn = _numel(layer.mlp)
        ffn_active = ffn
        if layer.is_moe:
            ffn_active -= config.inactive_expert_parameters(_numel(layer.mlp.experts))
        norms = _numel(layer.input_layernorm) + _numel(layer.post_attention_layernorm)
        kind = "moe" if layer.is_moe else "dense"
        rows.append(LayerCount(kind, _numel(layer.self_attn), ffn, ffn_active, norms))
    other = {
        "embedding": model.model.embed_tokens.weight.numel(),
        "head": 0 if config.tie_word_embeddings else model.lm_head.weight.numel(),
        "final_norm": _numel(model.model.norm),
    }
    return rows, other, model


def flops_per_token(config: ModelConfig, context: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token, averaged over a sequence of ``context`` tokens (default: the full context).

    ``matmul`` = 2 x the active weights used in matrix products (attention projections, router, the
    chosen experts / dense FFN, the output head); ``attention`` = 4 x heads x head_dim x the mean
    number of keys a query sees (``QK^T`` and ``AV``), per layer. Training costs about 3x forward.
    """
    rows, other, _ = layer_counts(config)
    c = config.max_position_embeddings if context is None else context
    norms = sum(r.norms for r in rows) + other["final_norm"]
    active = sum(r.active for r in rows) + other["embedding"] + other["head"] + other["final_norm"]
    # The embedding is a lookup; the head is one (V, D) matmul whether tied or not.
    head = config.vocab_size * config.hidden_size
    matmul = 2.0 * (active - norms - other["embedding"] - other["head"] + head)
    w = config.sliding_window
    mean_keys = sum(min(i + 1, w or c) for i in range(c)) / c
    attention = 4.0 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * mean_keys
    return {"matmul": matmul, "attention": attention, "total": matmul + attention, "context": float(c)}


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def describe(config: ModelConfig, context: int | None = None) -> str:
    """A multi-line report: shape, total/active parameters, per-layer breakdown, memory, FLOPs/token."""
    rows, other, model = layer_counts(config)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    c = config
    shared_width = c.shared_expert_intermediate_size
    shared = f", shared expert {shared_width}" if shared_width else ""
    lines = [
        f"decoder-only MoE LM: {c.num_hidden_layers} layer{'s' * (c.num_hidden_layers != 1)}, "
        f"hidden {c.hidden_size}, "
        f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv x {c.head_dim}, vocab {c.vocab_size}, "
        f"context {c.max_position_embeddings}, rope theta {c.rope_theta:g}"
        + (f", sliding window {c.sliding_window}" if c.sliding_window else ""),
        (f"experts: {c.num_experts} x (width {c.moe_intermediate_size}), "
         + (f"top-{c.top_k}" if c.router != "expert_choice" else f"~{c.experts_per_token:g} per token")
         + f", router {c.router}"
         + shared if any(r.kind == "moe" for r in rows) else "experts: none (a dense model)")
        + (f"; dense FFN width {c.intermediate_size}" if any(r.kind == "dense" for r in rows) else "")
        + f"; tied head: {c.tie_word_embeddings}",
        f"parameters: total {total:,} ({_human(total)}), active per token {active:,} ({_human(active)}), "
        f"{active / total:.1%} active",
        "",
        f"{'layers':<12} {'kind':<6} {'attention':>14} {'ffn':>16} {'ffn active':>16} {'layer total':>16}",
    ]
    start = 0
    for i in range(1, len(rows) + 1):  # one line per run of identical layers
        if i == len(rows) or rows[i] != rows[start]:
            r = rows[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            lines.append(
                f"{span:<12} {r.kind:<6} {r.attention:>14,} {r.ffn:>16,} {r.ffn_active:>16,} {r.total:>16,}"
            )
            start = i
    lines.append(f"{'embedding':<19} {other['embedding']:>14,}")
    tied = "  (tied to the embedding)" if c.tie_word_embeddings else ""
    lines.append(f"{'head':<19} {other['head']:>14,}{tied}")
    lines.append(f"{'final norm':<19} {other['final_norm']:>14,}")
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim  # K and V per token, x bytes/elem
    f = flops_per_token(c, context)
    lines += [
        "",
        f"weights: bf16 {_gib(2 * total)}, fp32 {_gib(4 * total)} "
        f"(active per token: bf16 {_gib(2 * active)})",
        f"KV cache per token: bf16 {kv_bytes * 2 / 1024:.1f} KiB; full context ({c.max_position_embeddings}) "
        f"bf16 {_gib(kv_bytes * 2 * c.max_position_embeddings)} per sequence",
        f"forward FLOPs per token (mean over {int(f['context'])} tokens): {_human(f['total'])} "
        f"(matmul {_human(f['matmul'])}, attention {_human(f['attention'])}); "
        f"training ~3x: {_human(3 * f['total'])}",
    ]
    return "\n".join(lines)
