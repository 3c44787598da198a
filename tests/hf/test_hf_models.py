"""Real HF checkpoints: transformers writes them, moekit loads them and gives the same numbers.

Peers: transformers' Mixtral, Qwen2Moe, Qwen3Moe and OlmoeForCausalLM (test dependency only).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from moekit.hf import from_pretrained, save_pretrained
from moekit.hf.keymap import plan_from_hf, remap
from moekit.inference import generate

from .builders import tiny_hf

transformers = pytest.importorskip("transformers")
KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
IDS = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, transformers model, single-file dir, sharded dir)."""
    hf = tiny_hf(request.param)
    single = tmp_path_factory.mktemp(f"{request.param}-single")
    sharded = tmp_path_factory.mktemp(f"{request.param}-sharded")
    hf.save_pretrained(single)
    hf.save_pretrained(sharded, max_shard_size="30KB")
    return request.param, hf, single, sharded


def _compare(model, hf):
    with torch.no_grad():
        ref = hf(IDS, output_router_logits=True)
        out = model(IDS, output_routing=True)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert len(out.routing) == len(ref.router_logits) > 0
    for ours, theirs in zip(out.routing, ref.router_logits):
        theirs = theirs.reshape(ours.router_logits.shape)
        torch.testing.assert_close(ours.router_logits, theirs, atol=1e-6, rtol=0)
        k = ours.expert_ids.shape[1]
        assert torch.equal(ours.expert_ids, theirs.topk(k, dim=-1).indices)


def test_layouts_on_disk_are_per_expert(saved):
    kind, _, single, sharded = saved
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    expert = "block_sparse_moe.experts.0.w1" if kind == "mixtral" else "mlp.experts.0.gate_proj"
    assert any(expert in k for k in index["weight_map"])
    assert (single / "model.safetensors").is_file()


def test_single_and_sharded_load_with_transformers_numbers(saved):
    kind, hf, single, sharded = saved
    for path in (single, sharded):
        model = from_pretrained(path)
        assert model.config.num_experts == hf.config.num_experts
        _compare(model, hf)
    if kind == "qwen2_moe":
        assert model.config.mlp_only_layers == (1,) and model.config.shared_expert_gate
    if kind == "qwen3_moe":
        c = model.config
        assert (c.qk_norm, c.head_dim, c.mlp_only_layers) == ("head", 12, (0,))
        assert c.shared_expert_intermediate_size == 0
        assert model.model.layers[1].self_attn.q_norm.weight.shape == (12,)
    if kind == "olmoe":
        assert model.config.qk_norm == "full" and not model.config.norm_topk_prob


def test_greedy_generation_identical(saved):
    _, hf, single, _ = saved
    model = from_pretrained(single)
    prompt = IDS[0, :7]
    mask = torch.ones(1, 7, dtype=torch.long)  # the prompt may hold id 0 (= pad): never mask it
    theirs = hf.generate(prompt[None], attention_mask=mask, max_new_tokens=20, do_sample=False,
                         pad_token_id=0)[0, 7:].tolist()
    ours = generate(model, [prompt.tolist()], 20, stop_token_ids=[])[0]
    assert len(ours) == 20 and ours == theirs


def test_moekit_save_round_trips_into_transformers(saved, tmp_path):
    kind, hf, single, _ = saved
    model = from_pretrained(single)
    model.save_pretrained(tmp_path / "out", max_shard_size="25KB")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    with torch.no_grad():  # same weights bit for bit; transformers may pick another expert kernel: 1e-6
        torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, atol=1e-6, rtol=0)
    _compare(from_pretrained(tmp_path / "out"), hf)


def test_remap_equals_transformers_in_memory_state_dict(saved):
    """The key map applied to the on-disk (per-expert) tensors gives transformers' own v5 state_dict."""
    from safetensors.torch import load_file

    _, hf, single, _ = saved
    disk = load_file(single / "model.safetensors")
    ours = remap(disk, plan_from_hf({k: tuple(v.shape) for k, v in disk.items()}))
    theirs = hf.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_v5_stacked_layout_loads(tmp_path):
    hf = tiny_hf("mixtral", seed=1)
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    _compare(from_pretrained(tmp_path), hf)


def test_tied_embeddings_and_dtype(tmp_path):
    hf = tiny_hf("mixtral", seed=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "tied")
    model = from_pretrained(tmp_path / "tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _compare(model, hf)
    save_pretrained(model, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, atol=1e-6, rtol=0)
    half = from_pretrained(tmp_path / "tied", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.lm_head.weight is half.model.embed_tokens.weight


def test_tied_config_with_another_stored_head_keeps_it_as_transformers_does(tmp_path):
    hf = tiny_hf("mixtral", seed=4)  # untied: lm_head.weight differs from the embedding
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.warns(UserWarning, match="differs from the embedding; keeping the stored head"):
        model = from_pretrained(tmp_path)
    assert not model.config.tie_word_embeddings
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, peer(IDS).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)


def test_loaded_weights_are_trainable_in_place(saved):
    """mmap-backed parameters are private copies on write: an optimizer step works, files stay intact."""
    _, _, single, _ = saved
    model = from_pretrained(single).train()
    before = from_pretrained(single).state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(IDS, labels=IDS)
    (out.loss + out.aux_loss).backward()
    opt.step()
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    again = from_pretrained(single).state_dict()
    assert all(torch.equal(again[k], v) for k, v in before.items())


def test_mixtral_head_dim_and_sliding_window(tmp_path):
    """head_dim != hidden / heads (Mistral-style) and a sliding window shorter than the input."""
    hf = tiny_hf("mixtral", seed=6, head_dim=16, sliding_window=5)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config.head_dim == 16 and model.config.sliding_window == 5
    _compare(model, hf)


def test_loading_progress_bar(tmp_path, capsys):
    tiny_hf("mixtral").save_pretrained(tmp_path)
    capsys.readouterr()
    from_pretrained(tmp_path)  # stderr is not a terminal here: no bar by default
    assert capsys.readouterr().err == ""
    from_pretrained(tmp_path, show_progress=True)
    assert "loading" in capsys.readouterr().err


def test_qwen3_30b_a3b_config_counts_the_published_parameters():
    """Qwen3-30B-A3B's config.json (its model card: 30.5B total, 29.9B non-embedding, 3.3B active)."""
    from moekit.hf.config_map import hf_to_kwargs
    from moekit.models import ModelConfig, MoEForCausalLM

    hf = dict(model_type="qwen3_moe", attention_bias=False, decoder_sparse_step=1, head_dim=128,
              hidden_act="silu", hidden_size=2048, intermediate_size=6144, max_position_embeddings=40960,
              mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True, num_attention_heads=32,
              num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4,
              rms_norm_eps=1e-6, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
              use_sliding_window=False, vocab_size=151936, bos_token_id=151643, eos_token_id=151645)
    with torch.device("meta"):
        model = MoEForCausalLM(ModelConfig(**hf_to_kwargs(hf)))
    total, active = model.num_parameters(), model.num_parameters(active=True)
    non_embedding = total - 2 * 151936 * 2048
    assert [round(n / 1e9, 1) for n in (total, non_embedding)] == [30.5, 29.9]
    assert active == 3_353_032_704  # embedding and head included; the card writes 3.3B
