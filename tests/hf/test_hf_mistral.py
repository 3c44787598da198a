"""Mistral's layout (params.json + consolidated.safetensors): HF -> Mistral -> HF is exact, and the q/k row
permutation matches Mistral's interleaved (complex) RoPE."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from moekit.hf import convert, from_pretrained
from moekit.hf.keymap import rope_half_to_interleaved, rope_interleaved_to_half

from .builders import tiny_hf

transformers = pytest.importorskip("transformers")


def _rope_half(x, theta):  # x (S, N, hd), HF rotate-half layout, float64
    s, _, hd = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rope_complex(x, theta):  # x (S, N, hd), Mistral interleaved pairs as complex numbers
    s, _, hd = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cis = torch.polar(torch.ones(s, hd // 2, dtype=torch.float64), torch.outer(torch.arange(s).double(), inv))
    xc = torch.view_as_complex(x.reshape(s, x.shape[1], -1, 2).contiguous()) * cis[:, None]
    return torch.view_as_real(xc).flatten(-2)


def test_permutation_reproduces_mistral_attention_scores():
    g = torch.Generator().manual_seed(0)
    heads, hd, d, s, theta = 3, 8, 16, 6, 1e4
    x = torch.randn(s, d, dtype=torch.float64, generator=g)
    wq_mistral = torch.randn(heads * hd, d, dtype=torch.float64, generator=g)
    wk_mistral = torch.randn(heads * hd, d, dtype=torch.float64, generator=g)
    wq_hf, wk_hf = rope_interleaved_to_half(wq_mistral, hd), rope_interleaved_to_half(wk_mistral, hd)
    q_m = _rope_complex((x @ wq_mistral.T).view(s, heads, hd), theta)
    k_m = _rope_complex((x @ wk_mistral.T).view(s, heads, hd), theta)
    q_h = _rope_half((x @ wq_hf.T).view(s, heads, hd), theta)
    k_h = _rope_half((x @ wk_hf.T).view(s, heads, hd), theta)
    torch.testing.assert_close(torch.einsum("shd,thd->hst", q_h, k_h), torch.einsum("shd,thd->hst", q_m, k_m))
    assert torch.equal(rope_half_to_interleaved(wq_hf, hd), wq_mistral)


def test_hf_to_mistral_and_back_is_exact(tmp_path):
    hf = tiny_hf("mixtral", seed=4)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    convert(tmp_path / "hf", tmp_path / "mistral", to="mistral")
    params = json.loads((tmp_path / "mistral" / "params.json").read_text())
    assert params["moe"] == {"num_experts_per_tok": 2, "num_experts": 4}
    required = {"dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
                "vocab_size"}
    assert required <= set(params)
    with safe_open(tmp_path / "mistral" / "consolidated.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight",
            "layers.1.feed_forward.experts.3.w2.weight", "layers.0.feed_forward.gate.weight"} <= keys
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    # hub repos may ship config.json next to params.json: without HF weights it is Mistral's layout
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "mistral" / "config.json")
    with torch.no_grad():
        ref = hf(ids).logits
        assert (from_pretrained(tmp_path / "mistral")(ids).logits - ref).abs().max() <= 1e-4
    convert(tmp_path / "mistral", tmp_path / "back", to="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    sharded = convert(tmp_path / "back", tmp_path / "mistral2", to="mistral", max_shard_size="30KB")
    assert len(list(sharded.glob("consolidated-*-of-*.safetensors"))) > 1
    single = from_pretrained(tmp_path / "mistral")
    assert torch.equal(from_pretrained(sharded)(ids).logits, single(ids).logits)


def test_convert_refuses_same_dir_and_unmappable_models(tmp_path):
    hf = tiny_hf("olmoe")
    hf.save_pretrained(tmp_path / "olmoe")
    with pytest.raises(ValueError, match="destination other than the source"):
        convert(tmp_path / "olmoe", tmp_path / "olmoe")
    with pytest.raises(ValueError, match=r"written as Mistral's layout \(Mixtral only\).*norm_topk_prob"):
        convert(tmp_path / "olmoe", tmp_path / "m", to="mistral")
    with pytest.raises(ValueError, match="to must be"):
        convert(tmp_path / "olmoe", tmp_path / "m", to="gguf")
    run = tmp_path / "run"  # a training run, or a folder of the user's own: never mixed into
    run.mkdir()
    (run / "run.json").write_text("{}")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for dst, match in ((run, "is a moekit train run"), (notes, "holds no checkpoint")):
        with pytest.raises(ValueError, match=match):
            convert(tmp_path / "olmoe", dst)
        assert not (dst / "config.json").exists()
    convert(tmp_path / "olmoe", tmp_path / "again")
    convert(tmp_path / "olmoe", tmp_path / "again")  # a checkpoint is replaced, as save_pretrained would


def test_converting_into_a_checkpoint_of_the_other_layout_replaces_it(tmp_path):
    """HF over Mistral and Mistral over HF: the folder then loads as the model just written."""
    a, b = tiny_hf("mixtral", seed=1), tiny_hf("mixtral", seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    for first, second, to in (("a", "b", "mistral"), ("b", "a", "hf")):
        dst = tmp_path / f"over-{to}"
        convert(tmp_path / first, dst, to="hf" if to == "mistral" else "mistral")
        convert(tmp_path / second, dst, to=to)
        stale = {"mistral": ["config.json", "model.safetensors"],
                 "hf": ["params.json", "consolidated.safetensors"]}[to]
        assert not any((dst / name).exists() for name in stale)
        peer = a if second == "a" else b
        with torch.no_grad():
            torch.testing.assert_close(from_pretrained(dst)(ids).logits, peer(ids).logits, atol=1e-5, rtol=0)


def test_pickled_mistral_weights_get_advice_for_that_layout(tmp_path):
    from safetensors.torch import load_file

    from moekit.hf import CheckpointError

    tiny_hf("mixtral").save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m", to="mistral")
    state = load_file(tmp_path / "m" / "consolidated.safetensors")
    (tmp_path / "m" / "consolidated.safetensors").unlink()
    torch.save(state, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="only pickle weights") as info:
        from_pretrained(tmp_path / "m")
    command = str(info.value).split("`")[1]
    assert "AutoModelForCausalLM" not in command and "consolidated.00.safetensors" in command
    exec(command.removeprefix('python -c "').removesuffix('"'))  # the advice works as given
    assert from_pretrained(tmp_path / "m").config.num_experts == 4
