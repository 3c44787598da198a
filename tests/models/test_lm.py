"""MoEForCausalLM: outputs, loss, aux loss, layer layout, tied head, parameter counts, errors."""

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.models import ModelConfig, MoEForCausalLM, get_preset


def cfg(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=40,
        num_experts=4,
        top_k=2,
        max_position_embeddings=32,
    )
    base.update(kw)
    return ModelConfig(**base)


def test_mixtral_8x7b_parameter_counts_on_meta():
    with torch.device("meta"):
        model = MoEForCausalLM(get_preset("mixtral-8x7b"))
    assert model.num_parameters() == 46_702_792_704
    assert model.num_parameters(active=True) == 12_879_925_248


def test_forward_outputs_and_loss():
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg())
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels, output_routing=True)
    assert out.logits.shape == (2, 11, 64) and out.logits.dtype == torch.float32
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert len(out.routing) == 3 and all(r.expert_ids.shape == (22, 2) for r in out.routing)
    torch.testing.assert_close(out.aux_loss, sum(r.aux_loss for r in out.routing))
    (out.loss + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None
    assert model(ids).loss is None and model(ids).routing is None


def test_moe_layers_are_moekit_moe_and_layout_follows_config():
    model = MoEForCausalLM(cfg(num_hidden_layers=4, decoder_sparse_step=2))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["DenseMLP", "MoE", "DenseMLP", "MoE"]
    assert all(isinstance(m, moekit.core.MoE) for m in model.moe_layers())
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.1.mlp.experts.gate_up_proj" in keys
    dense = MoEForCausalLM(cfg(num_experts=0))
    assert dense.moe_layers() == [] and dense(torch.zeros(1, 3, dtype=torch.long)).aux_loss.item() == 0.0


def count_by_hand(c: ModelConfig) -> tuple[int, int]:
    d, hd = c.hidden_size, c.head_dim
    attn = d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    if c.attention_bias:
        attn += hd * (c.num_attention_heads + 2 * c.num_key_value_heads)
    if c.qk_norm == "full":
        attn += hd * (c.num_attention_heads + c.num_key_value_heads)
    if c.qk_norm == "head":
        attn += 2 * hd
    total = active = c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + d
    for i in range(c.num_hidden_layers):
        base = attn + 2 * d
        if c.is_moe_layer(i):
            expert = 3 * d * c.moe_intermediate_size
            shared = 3 * d * c.shared_expert_intermediate_size + (d if c.shared_expert_gate else 0)
            total += base + c.num_experts * (expert + d) + shared
            active += base + c.top_k * expert + c.num_experts * d + shared
        else:
            total += base + 3 * d * c.intermediate_size
            active += base + 3 * d * c.intermediate_size
    return total, active


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tie_word_embeddings=True),
        dict(decoder_sparse_step=2, first_k_dense_replace=1),
        dict(attention_bias=True, qk_norm=True, head_dim=6),
        dict(qk_norm="head", head_dim=6),
        dict(shared_expert_intermediate_size=16, shared_expert_gate=True),
        dict(num_experts=0),
    ],
)
def test_parameter_counts_match_hand_count(kw):
    c = cfg(**kw)
    model = MoEForCausalLM(c)
    assert (model.num_parameters(), model.num_parameters(active=True)) == count_by_hand(c)


def test_tied_head_shares_the_embedding():
    model = MoEForCausalLM(cfg(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_is_normal_with_initializer_range():
    model = MoEForCausalLM(cfg(initializer_range=0.05, attention_bias=True))
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert abs(w.std().item() - 0.05) < 0.005
    assert model.model.layers[0].self_attn.q_proj.bias.abs().max() == 0
    assert model.model.norm.weight.eq(1).all()


def test_meta_model_materialises_with_correct_rope():
    c = cfg()
    torch.manual_seed(0)
    ref = MoEForCausalLM(c).eval()
    with torch.device("meta"):
        model = MoEForCausalLM(c)
    model.to_empty(device="cpu").load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(model.eval()(ids).logits, ref(ids).logits)


def test_input_errors():
    model = MoEForCausalLM(cfg())
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="ModelConfig"):
        MoEForCausalLM({"hidden_size": 3})
    with pytest.raises(TypeError, match="labels must be an int64"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 3))


def test_int32_ids_and_labels_give_the_int64_loss():
    model = MoEForCausalLM(cfg())
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, labels=ids).loss
        for return_logits in (True, False):
            got = model(ids.int(), labels=ids.int(), return_logits=return_logits).loss
            torch.testing.assert_close(got, want)


def test_describe_reports_counts_memory_and_flops():
    from moekit.models.info import describe, flops_per_token, layer_counts

    text = describe(get_preset("mixtral-8x7b"))
    assert "46,702,792,704" in text and "12,879,925,248" in text
    assert "bf16 86.99 GiB" in text and "fp32 173.98 GiB" in text  # 2 and 4 bytes x 46.7B
    c = cfg(decoder_sparse_step=2, tie_word_embeddings=True)
    rows, other, _ = layer_counts(c)
    total, active = count_by_hand(c)
    assert sum(r.total for r in rows) + sum(other.values()) == total
    assert sum(r.active for r in rows) + sum(other.values()) == active
    assert [r.kind for r in rows] == ["dense", "moe", "dense"]
    f = flops_per_token(c, context=8)
    norms = sum(r.norms for r in rows) + other["final_norm"]
    assert f["matmul"] == 2 * (active - norms)  # tied: the embedding's matrix is the head's matmul
    untied = c.replace(tie_word_embeddings=False)
    # untied: the head counts once, the embedding (a lookup) not at all
    assert flops_per_token(untied, context=8)["matmul"] == f["matmul"]
    assert f["attention"] == 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 4.5  # mean keys
    windowed = flops_per_token(c.replace(sliding_window=2), context=8)["attention"]
    assert windowed == 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * (1 + 2 * 7) / 8


def test_expert_choice_counts_capacity_factor_experts_per_token():
    """Each expert takes T * capacity_factor / E tokens: a token uses capacity_factor experts on
    average, whatever top_k says."""
    from moekit.models.info import describe, layer_counts

    for factor, per_token in ((None, 1.0), (2.0, 2.0)):
        c = cfg(router="expert_choice", capacity_factor=factor)
        model = MoEForCausalLM(c)
        per_expert = sum(p.numel() for p in model.moe_layers()[0].experts.parameters()) // c.num_experts
        inactive = len(model.moe_layers()) * per_expert * (c.num_experts - per_token)
        assert c.experts_per_token == per_token
        assert model.num_parameters(active=True) == model.num_parameters() - inactive
        rows, other, _ = layer_counts(c)
        assert sum(r.active for r in rows) + sum(other.values()) == model.num_parameters(active=True)
        assert f"~{per_token:g} per token" in describe(c)


def test_noisy_topk_noise_projection_starts_at_zero_in_the_lm():
    model = MoEForCausalLM(cfg(router="noisy_topk"))
    for moe in model.moe_layers():
        assert torch.count_nonzero(moe.gate.noise_weight) == 0 and torch.count_nonzero(moe.gate.weight) > 0


def test_describe_says_dense_when_no_layer_is_moe():
    from moekit.models.info import describe

    assert "experts: none (a dense model)" in describe(cfg(first_k_dense_replace=3))
    one = describe(cfg(num_hidden_layers=1))  # all MoE: no dense FFN width to speak of
    assert "1 layer," in one and "dense FFN" not in one
    assert "dense FFN width" in describe(cfg(first_k_dense_replace=1))


def test_input_pos_without_a_cache_is_checked():
    model = MoEForCausalLM(cfg(max_position_embeddings=16))
    ids = torch.randint(0, 40, (1, 4))
    assert model.model(ids, input_pos=torch.arange(4) + 12)[0].shape == (1, 4, 32)  # positions 12..15
    for bad in (torch.arange(4) + 13, torch.arange(4)[None], torch.arange(4) - 2):  # (-2 would wrap)
        with pytest.raises(ValueError, match=r"input_pos must be \(4,\) positions in \[0, "):
            model.model(ids, input_pos=bad)
