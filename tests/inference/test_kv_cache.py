"""KV-cache decoding equals recomputing the whole sequence without a cache (full and sliding window)."""

import pytest
import torch

from moekit.inference import StaticKVCache, decode_one_token, prefill
from moekit.inference import cache as cache_module
from moekit.models import ModelConfig, MoEForCausalLM


def make_model(seed=0, **kw):
    base = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts=4,
        top_k=2,
        max_position_embeddings=64,
        rope_theta=1e4,
    )
    base.update(kw)
    torch.manual_seed(seed)
    model = MoEForCausalLM(ModelConfig(**base)).eval()
    with torch.no_grad():  # larger weights: sharper attention and routing, so mistakes show
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model


def cached_logits(model, seq, prompt_len, pads=None):
    """Logits at every position from prompt_len - 1 on: one prefill, then one decode step per token."""
    B, S = seq.shape
    cache = StaticKVCache(model.config, B, S, pad_lengths=pads)
    slots = torch.arange(S)
    out = [prefill(model, seq[:, :prompt_len], cache, slots[:prompt_len])]
    for t in range(prompt_len, S):
        out.append(decode_one_token(model, seq[:, t : t + 1], cache, slots[t : t + 1]))
    return torch.stack(out, dim=1)  # (B, S - prompt_len + 1, V)


@pytest.mark.parametrize(
    "kw", [dict(), dict(sliding_window=4), dict(sliding_window=4, num_key_value_heads=4)]
)
def test_decode_equals_full_recomputation(kw):
    model = make_model(**kw)
    seq = torch.randint(0, 96, (3, 14), generator=torch.Generator().manual_seed(1))
    prompt_len = 5  # 9 decode steps: the window (4) is shorter than both prompt and sequence
    with torch.no_grad():
        full = model(seq).logits[:, prompt_len - 1 :]
    torch.testing.assert_close(cached_logits(model, seq, prompt_len), full, atol=2e-5, rtol=1e-5)


def test_sliding_window_changes_the_result():
    # Guard against a window that silently does nothing: same weights, different outputs.
    seq = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    windowed = cached_logits(make_model(sliding_window=3), seq, 4)
    full = cached_logits(make_model(), seq, 4)
    assert (windowed[:, 0] - full[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(), dict(sliding_window=3)])
def test_left_padded_rows_equal_single_rows(kw):
    model = make_model(**kw)
    g = torch.Generator().manual_seed(3)
    lengths, new = [7, 3, 5], 6
    rows = [torch.randint(0, 96, (n + new,), generator=g) for n in lengths]
    width = max(lengths)
    pads = [width - n for n in lengths]
    batch = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pads, rows)])
    got = cached_logits(model, batch, width, pads)
    for b, r in enumerate(rows):
        alone = cached_logits(model, r[None], lengths[b])
        torch.testing.assert_close(got[b], alone[0], atol=2e-5, rtol=1e-5)


def test_mask_built_per_call_for_large_caches(monkeypatch):
    model = make_model(sliding_window=4)
    seq = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    expected = cached_logits(model, seq, 4, pads=[0, 2])
    monkeypatch.setattr(cache_module, "_MAX_PRECOMPUTED_MASK", 0)
    c = StaticKVCache(model.config, 2, 10, pad_lengths=[0, 2])
    assert c._mask is None
    torch.testing.assert_close(cached_logits(model, seq, 4, pads=[0, 2]), expected)


def test_cache_errors():
    c = make_model().config
    with pytest.raises(ValueError, match="pad_lengths needs 2"):
        StaticKVCache(c, 2, 8, pad_lengths=[1])
    with pytest.raises(ValueError, match="pad_lengths must lie"):
        StaticKVCache(c, 2, 8, pad_lengths=[0, 8])
    with pytest.raises(ValueError, match="input_pos"):
        make_model().model(torch.zeros(1, 2, dtype=torch.long), kv_cache=StaticKVCache(c, 1, 4))
