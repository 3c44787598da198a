"""Same state_dict as transformers' MixtralForCausalLM -> same logits and the same greedy tokens.

This proves the naming contract (a Mixtral checkpoint loads with ``strict=True``) and the math.
transformers is a test dependency only.
"""

import pytest
import torch

from moekit.inference import generate
from moekit.models import ModelConfig, MoEForCausalLM

transformers = pytest.importorskip("transformers")


def configs(**kw):
    ours = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_experts=4,
        top_k=2,
        max_position_embeddings=128,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        **kw,
    )
    hf = transformers.MixtralConfig(
        vocab_size=ours.vocab_size,
        hidden_size=ours.hidden_size,
        intermediate_size=ours.moe_intermediate_size,
        num_hidden_layers=ours.num_hidden_layers,
        num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads,
        head_dim=ours.head_dim,
        max_position_embeddings=ours.max_position_embeddings,
        rms_norm_eps=ours.rms_norm_eps,
        num_local_experts=ours.num_experts,
        num_experts_per_tok=ours.top_k,
        sliding_window=ours.sliding_window,
        tie_word_embeddings=ours.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return ours, hf


def pair(seed=0, **kw):
    ours, hf_cfg = configs(**kw)
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF's init is small; widen it so routing and attention are far from uniform
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    model = MoEForCausalLM(ours).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model, hf


@pytest.mark.parametrize("kw", [dict(), dict(sliding_window=5)])
def test_logits_match_transformers(kw):
    model, hf = pair(**kw)
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_state_dict_keys_equal_transformers():
    model, hf = pair()
    assert sorted(model.state_dict()) == sorted(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert model.state_dict()[k].shape == v.shape, k


def test_greedy_generation_matches_transformers():
    model, hf = pair(seed=3)
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    ours = generate(model, prompt.tolist(), 20)
    assert ours[0] == theirs[0, 9:].tolist()
    assert len(ours[0]) == 20
