"""ModelConfig: presets, JSON round trip, derived fields, layer layout and input errors."""

import json

import pytest

from moekit.models import PRESETS, ModelConfig, get_preset


def small(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts=4,
        top_k=2,
        max_position_embeddings=64,
    )
    base.update(kw)
    return ModelConfig(**base)


def test_mixtral_preset_is_the_paper_table():
    c = PRESETS["mixtral-8x7b"]
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.intermediate_size) == (4096, 32, 128, 14336)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 32000)
    assert (c.num_experts, c.top_k, c.max_position_embeddings, c.rope_theta) == (8, 2, 32768, 1e6)
    assert c.moe_intermediate_size == 14336 and not c.tie_word_embeddings and c.sliding_window is None


def test_tiny_preset_matches_the_issue_speed_config():
    c = PRESETS["tiny"]
    assert (c.hidden_size, c.moe_intermediate_size, c.num_hidden_layers, c.num_experts, c.top_k) == (
        256,
        512,
        4,
        8,
        2,
    )
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 2, 4096)
    assert PRESETS["small"].hidden_size > c.hidden_size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    c = PRESETS[name]
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c


def test_round_trip_with_tuple_fields():
    c = small(mlp_only_layers=(0, 2), sliding_window=8, attention_bias=True, qk_norm="head")
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("name",
                         ["attention_bias", "tie_word_embeddings", "norm_topk_prob", "shared_expert_gate"])
def test_switches_must_be_booleans(name):
    with pytest.raises(ValueError, match=f"ModelConfig.{name} must be True or False, got 'no'"):
        small(**{name: "no"})


def test_qk_norm_values():
    assert small(qk_norm=True).qk_norm == "full" and small(qk_norm=False).qk_norm is None
    old = {**small().to_dict(), "qk_norm": False}  # run.json files written before "head" existed
    assert ModelConfig.from_dict(old) == small()
    with pytest.raises(ValueError, match=r"qk_norm must be one of \(None, 'full', 'head'\), got 'heads'"):
        small(qk_norm="heads")


def test_from_dict_errors():
    d = PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match="unknown ModelConfig key.*'bogus'"):
        ModelConfig.from_dict({**d, "bogus": 1})
    del d["hidden_size"]
    with pytest.raises(ValueError, match="missing required key.*hidden_size"):
        ModelConfig.from_dict(d)
    with pytest.raises(TypeError):
        ModelConfig.from_dict([1, 2])


def test_get_preset_and_overrides():
    c = get_preset("tiny", num_hidden_layers=2, hidden_size=128)
    assert c.num_hidden_layers == 2 and c.head_dim == 16  # head_dim follows hidden_size // heads
    assert get_preset("tiny", intermediate_size=100).moe_intermediate_size == 100
    assert get_preset("tiny") is PRESETS["tiny"]
    with pytest.raises(ValueError, match="available presets"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_preset("tiny", hiden_size=3)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(hidden_size=30), "head_dim"),
        (dict(head_dim=7), "even"),
        (dict(top_k=5), "top_k"),
        (dict(router="nope"), "router"),
        (dict(moe_backend="cuda"), "moe_backend"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(mlp_only_layers=(4,)), "mlp_only_layers"),
        (dict(eos_token_id=64), "eos_token_id"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(num_hidden_layers=1.5), "num_hidden_layers"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0, first_k_dense_replace=4), "capacity_factor"),  # no MoE layer: still
        (dict(router="switch", top_k=2, decoder_sparse_step=5), "top_k"),
        (dict(initializer_range=float("inf")), "initializer_range must be finite"),
        (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be finite"),
        (dict(rope_theta=float("nan")), "rope_theta must be finite"),
    ],
)
def test_bad_values_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_layer_layout():
    assert [small().is_moe_layer(i) for i in range(4)] == [True] * 4
    assert [small(decoder_sparse_step=2).is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [small(first_k_dense_replace=1).is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert [small(mlp_only_layers=(1, 3)).is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    assert not any(small(num_experts=0).is_moe_layer(i) for i in range(4))


def test_moe_config_carries_the_fields():
    m = small(router_z_loss_coef=0.001, capacity_factor=1.25, shared_expert_intermediate_size=16).moe_config()
    assert (m.hidden_size, m.intermediate_size, m.num_experts, m.top_k) == (32, 48, 4, 2)
    assert (m.router_z_loss_coef, m.capacity_factor, m.shared_expert_intermediate_size) == (0.001, 1.25, 16)
    assert m.activation == "swiglu"
