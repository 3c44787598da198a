"""Pure properties of the key maps and the shard writer / reader (no transformers needed)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.hf.checkpoint import TensorReader, find_tensors, write_sharded
from moekit.hf.keymap import (
    build,
    hf_from_state,
    mistral_from_state,
    plan_from_hf,
    plan_from_mistral,
    remap,
    rope_half_to_interleaved,
    rope_interleaved_to_half,
)


def moekit_state(layers, experts, d, f, heads, hd, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = {"model.embed_tokens.weight": r(11, d), "model.norm.weight": r(d), "lm_head.weight": r(11, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": r(d), p + "post_attention_layernorm.weight": r(d),
            p + "self_attn.q_proj.weight": r(heads * hd, d), p + "self_attn.k_proj.weight": r(hd, d),
            p + "self_attn.v_proj.weight": r(hd, d), p + "self_attn.o_proj.weight": r(d, heads * hd),
            p + "mlp.gate.weight": r(experts, d), p + "mlp.experts.gate_up_proj": r(experts, 2 * f, d),
            p + "mlp.experts.down_proj": r(experts, d, f),
        })
    return state


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 5),
                   st.integers(1, 3), st.sampled_from([2, 4, 6]), st.integers(0, 99))


@settings(max_examples=25, deadline=None)
@given(shapes, st.sampled_from(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]))
def test_per_expert_layout_round_trips(s, model_type):
    state = moekit_state(*s)
    disk = dict(hf_from_state(state, model_type))
    if model_type == "mixtral":
        assert all(".mlp." not in k for k in disk)
    back = remap(disk, plan_from_hf({k: tuple(v.shape) for k, v in disk.items()}))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_mistral_layout_round_trips(s):
    state = moekit_state(*s)
    hd = s[5]
    disk = dict(mistral_from_state(state, hd))
    assert "tok_embeddings.weight" in disk and "layers.0.feed_forward.experts.0.w3.weight" in disk
    back = remap(disk, plan_from_mistral({k: tuple(v.shape) for k, v in disk.items()}, hd))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


@given(st.integers(1, 4), st.sampled_from([2, 4, 8]), st.integers(1, 3))
def test_rope_permutations_are_inverse(heads, hd, cols):
    w = torch.arange(heads * hd * cols, dtype=torch.float64).reshape(heads * hd, cols)
    assert torch.equal(rope_half_to_interleaved(rope_interleaved_to_half(w, hd), hd), w)
    # within a head, interleaved pair j (rows 2j, 2j+1) becomes rows j and j + hd/2
    half = rope_interleaved_to_half(w, hd)
    assert torch.equal(half[1], w[2]) if hd > 2 else torch.equal(half[1], w[1])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from([torch.float32, torch.bfloat16, torch.int64])),
                min_size=1, max_size=8), st.integers(1, 400))
def test_shards_write_and_read_back(tmp_path_factory, tensors, limit):
    out = tmp_path_factory.mktemp("shards")
    state = {f"t{i}": torch.arange(n).to(dtype) for i, (n, dtype) in enumerate(tensors)}
    files = write_sharded(state.items(), out, max_shard_size=limit)
    infos = find_tensors(out, "hf")
    assert len(files) == len({info.file for info in infos.values()}) >= 1
    reader = TensorReader(infos)
    for name, t in state.items():
        assert torch.equal(reader(name), t) and torch.equal(reader.read(name), t)
        if t.is_floating_point():  # read_into converts dtype on the way
            src = plan_from_hf({name: tuple(t.shape)})[name]
            assert torch.equal(build(src, reader, torch.float64), t.double())
    reader.close()


# mistralai/Mixtral-8x7B-v0.1 config.json (transformers 4.36 era: top-level rope_theta, torch_dtype)
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000,
}


def test_real_mixtral_config_maps_to_the_preset_and_back():
    from moekit.hf.config_map import hf_from_config, hf_to_kwargs
    from moekit.models import ModelConfig, get_preset

    cfg = ModelConfig(**hf_to_kwargs(MIXTRAL_8X7B_CONFIG))
    assert cfg == get_preset("mixtral-8x7b")
    back = hf_from_config(cfg, dtype="bfloat16")
    for key, value in MIXTRAL_8X7B_CONFIG.items():
        if key not in ("rope_theta", "torch_dtype"):
            assert back[key] == value, key
    assert back["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert back["dtype"] == "bfloat16"
