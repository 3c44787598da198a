"""RMSNorm, RoPE, grouped-query and sliding-window attention against plain float64 references."""

import math

import pytest
import torch

from moekit.models import ModelConfig
from moekit.models.layers import (
    Attention,
    RMSNorm,
    RotaryEmbedding,
    additive_mask,
    apply_rope,
    sliding_window_mask,
)


def cfg(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts=0,
        max_position_embeddings=64,
        rope_theta=500.0,
    )
    base.update(kw)
    return ModelConfig(**base)


def rope_reference(x, positions, theta):
    """Rotate-half RoPE as complex multiplication, float64: pair (i, i + hd/2) is one complex number."""
    hd = x.shape[-1]
    half = hd // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    out = torch.empty_like(z)
    for s, p in enumerate(positions.tolist()):
        for i in range(half):
            angle = p / theta ** (2 * i / hd)
            out[:, s, :, i] = z[:, s, :, i] * complex(math.cos(angle), math.sin(angle))
    return torch.cat([out.real, out.imag], dim=-1)


def attention_reference(attn, x, positions, window, theta):
    """Per-head loop in float64: q/k/v projections, RoPE, causal (windowed) softmax attention."""
    B, S, _ = x.shape
    H, KV, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    x = x.double()

    def proj(lin, n):
        w = lin.weight.double()
        y = x @ w.T + (lin.bias.double() if lin.bias is not None else 0)
        return y

    q, k, v = proj(attn.q_proj, H), proj(attn.k_proj, KV), proj(attn.v_proj, KV)

    def rms(z, norm):
        return z / torch.sqrt((z * z).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    if attn.qk_norm == "full":  # over all heads at once (OLMoE)
        q, k = rms(q, attn.q_norm), rms(k, attn.k_norm)
    q, k = q.view(B, S, H, hd), k.view(B, S, KV, hd)
    if attn.qk_norm == "head":  # each head on its own, one weight (Qwen3-MoE)
        q, k = rms(q, attn.q_norm), rms(k, attn.k_norm)
    q, k = rope_reference(q, positions, theta), rope_reference(k, positions, theta)
    v = v.view(B, S, KV, hd)
    out = torch.zeros(B, S, H, hd, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // KV)  # query head h reads key/value head h // group
            for i in range(S):
                js = [j for j in range(S) if j <= i and (window is None or i - j < window)]
                scores = torch.stack([q[b, i, h] @ k[b, j, g] for j in js]) / math.sqrt(hd)
                p = torch.softmax(scores, 0)
                out[b, i, h] = sum(p[n] * v[b, j, g] for n, j in enumerate(js))
    return out.reshape(B, S, H * hd) @ attn.o_proj.weight.double().T


def run_attention(attn, x, theta, max_pos=64):
    rope = RotaryEmbedding(attn.head_dim, theta, max_pos)
    cos_t, sin_t = rope.tables(x.device, x.dtype)
    S = x.shape[1]
    pos = torch.arange(S)
    window = attn.sliding_window
    mask = (
        None
        if window is None or window >= S
        else additive_mask(sliding_window_mask(pos, pos, window), x.dtype)
    )
    return attn(x, cos_t[pos][None, :, None], sin_t[pos][None, :, None], mask)


def test_rmsnorm_matches_reference():
    torch.manual_seed(0)
    n = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        n.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * n.weight.double()
    torch.testing.assert_close(n.double()(x), ref)
    low = n.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, atol=0.05, rtol=0.02)


def test_rope_matches_complex_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 5, 9, 30, 63])
    cos_t, sin_t = RotaryEmbedding(8, 1e4, 64).tables(torch.device("cpu"), torch.float64)
    got = apply_rope(x, cos_t[pos][None, :, None], sin_t[pos][None, :, None])
    torch.testing.assert_close(got, rope_reference(x, pos, 1e4))
    # Rotation keeps norms, and relative: <R(p)q, R(p')k> depends on p - p' only.
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


def test_rope_relative_position_property():
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    cos_t, sin_t = RotaryEmbedding(16, 1e6, 64).tables(torch.device("cpu"), torch.float64)

    def rot(x, p):
        return apply_rope(x, cos_t[p].view(1, 1, 1, -1), sin_t[p].view(1, 1, 1, -1))

    a = (rot(q, 10) * rot(k, 3)).sum()
    b = (rot(q, 40) * rot(k, 33)).sum()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # GQA 4 query heads / 2 KV heads
        dict(num_key_value_heads=4),  # plain multi-head
        dict(num_key_value_heads=1),  # multi-query
        dict(attention_bias=True, qk_norm=True),
        dict(qk_norm="head", head_dim=6),
        dict(sliding_window=3),
        dict(head_dim=6, rope_theta=1e6),
    ],
)
def test_attention_matches_float64_reference(kw):
    torch.manual_seed(0)
    c = cfg(**kw)
    attn = Attention(c).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, c.hidden_size, dtype=torch.float64)
    got = run_attention(attn, x, c.rope_theta)
    ref = attention_reference(attn, x, torch.arange(9), c.sliding_window, c.rope_theta)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_sliding_window_mask_is_band():
    m = sliding_window_mask(torch.arange(6), torch.arange(6), 3)
    expected = torch.tensor([[int(0 <= i - j < 3) for j in range(6)] for i in range(6)], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert torch.equal(
        sliding_window_mask(torch.arange(4), torch.arange(4), None), torch.ones(4, 4).tril().bool()
    )


def test_rope_tables_on_meta_device_are_not_cached():
    rope = RotaryEmbedding(8, 1e4, 16)
    cos, _ = rope.tables(torch.device("meta"), torch.float32)
    assert cos.shape == (16, 8) and cos.device.type == "meta"
    cos, _ = rope.tables(torch.device("cpu"), torch.float32)
    assert cos[0].eq(1).all()
