"""The pieces of a decoder block: RMSNorm, rotary embedding, grouped-query attention, dense SwiGLU FFN.

Shape legend: B batch, S query positions, P cache slots (keys), D hidden size, H query heads,
KV key/value heads, hd head_dim. Parameter names equal transformers' Mixtral (``q_proj``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.kernels import linear
from moekit.models.config import ModelConfig


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32 at least."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Low precision: normalise in float32, then scale in the input dtype (as HF Mixtral does).
        h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding:
    """cos/sin tables of the rotary embedding (rotate-half layout, as HF Llama/Mixtral).

    The tables are plain tensors, not buffers: they stay out of the state_dict and are computed
    lazily (in float64, then cast) for each (device, dtype) a model runs in, so a model built on
    the meta device and materialised later still gets correct tables.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(max_positions, head_dim)`` in the layout :func:`apply_rope` takes.

        With ``c, s`` the ``head_dim // 2`` angles' cosines and sines: ``cos = [c, c]`` and
        ``sin = [-s, s]``, so that rotate-half is one ``roll`` (see :func:`apply_rope`).
        """
        key = (device, dtype)
        if key not in self._tables:
            if device.type == "meta":
                shape = (self.max_positions, self.head_dim)
                return torch.empty(shape, device=device, dtype=dtype), torch.empty(
                    shape, device=device, dtype=dtype
                )
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            inv_freq = 1.0 / (self.theta**exps)
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)
            cos, sin = angles.cos(), angles.sin()
            self._tables[key] = (
                torch.cat([cos, cos], -1).to(device, dtype),
                torch.cat([-sin, sin], -1).to(device, dtype),
            )
        return self._tables[key]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, S, N, hd)`` by tables ``cos, sin (B or 1, S, 1, hd)`` from :class:`RotaryEmbedding`.

    Rotate-half layout (HF Llama / Mixtral): with ``x = [x1, x2]`` the result is
    ``[x1 c - x2 s, x2 c + x1 s]``, computed as ``x * [c, c] + roll(x, hd/2) * [-s, s]`` (3 ops).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def sliding_window_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean ``(..., S, P)``: key ``j`` visible from query ``i`` iff ``j <= i`` and ``i - j < window``."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if window is not None:
        mask = mask & (diff < window)
    return mask


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask (True = attend) -> additive ``0 / -inf`` mask of ``dtype``.

    SDPA's CPU flash kernel takes additive masks on a fast path; with boolean masks it can be
    orders of magnitude slower when several threads are busy, so the model always passes these.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE, optional q/k/v bias and qk-norm.

    ``qk_norm="full"`` (OLMoE) normalises the whole ``(H * hd)`` query / ``(KV * hd)`` key vectors,
    ``"head"`` (Qwen3-MoE) each head's ``hd`` values with a ``(hd,)`` weight; both before RoPE.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.sliding_window = config.sliding_window
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm is None:
            self.q_norm = self.k_norm = None
        else:
            per_head = config.qk_norm == "head"
            self.q_norm = RMSNorm(hd if per_head else self.num_heads * hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd if per_head else self.num_kv_heads * hd, config.rms_norm_eps)

    def forward(
        self,
        x_BSD: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv: tuple[Tensor, Tensor] | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """``x (B, S, D) -> (B, S, D)``.

        Args:
            cos, sin: rotary tables for the S positions, ``(B or 1, S, 1, hd)``.
            mask: additive float ``(B or 1, 1, S, P)`` (0 = attend, -inf = not) or ``None`` for
                plain causal attention.
            kv: the layer's cache ``(k, v)``, each ``(B, KV, P, hd)``; the new keys/values are
                written at slots ``input_pos (S,)`` and attention runs over all P slots.
        """
        B, S, _ = x_BSD.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # The projections call moekit.kernels.linear on the modules' weights: nn.Module call overhead
        # is a large share of a decode step at small sizes (state_dict names stay q_proj.weight, ...),
        # and float32 CPU matmuls go through oneDNN where that is faster (moekit.kernels.cpu).
        q = linear(x_BSD, self.q_proj.weight, self.q_proj.bias)
        k = linear(x_BSD, self.k_proj.weight, self.k_proj.bias)
        v = linear(x_BSD, self.v_proj.weight, self.v_proj.bias)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, S, H, hd), k.view(B, S, KV, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None and S == 1:
            # Decode step: with one position, (B, 1, N, hd) and (B, N, 1, hd) share their memory
            # layout, so no transposes; the H query heads of a group become `group` queries of
            # their KV head for SDPA, which then reads the cache without copying K/V per head.
            k_cache, v_cache = kv
            if k.dtype != k_cache.dtype:
                k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
            k_cache.index_copy_(2, input_pos, k.view(B, KV, 1, hd))
            v_cache.index_copy_(2, input_pos, v.view(B, KV, 1, hd))
            y = F.scaled_dot_product_attention(q.view(B, KV, H // KV, hd), k_cache, v_cache, attn_mask=mask)
            return linear(y.reshape(B, 1, H * hd), self.o_proj.weight)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, hd), (B, KV, S, hd)
        v = v.view(B, S, KV, hd).transpose(1, 2)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and S > 1, enable_gqa=H > KV
        )
        return linear(y.transpose(1, 2).reshape(B, S, H * hd), self.o_proj.weight)  # (B, S, D)


class DenseMLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` of the dense (non-MoE) layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight)
        return linear(h, self.down_proj.weight)
