"""Every broken checkpoint is refused with an error that names the file or the tensor."""

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file

from moekit.hf import CheckpointError, from_pretrained, load_tokenizer
from moekit.hf.checkpoint import parse_size
from moekit.hf.config_map import hf_to_kwargs, mistral_to_kwargs

from .builders import tiny_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = tiny_hf("mixtral")
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="30KB")
    return root


def _copy(ckpt, name, tmp_path):
    return shutil.copytree(ckpt / name, tmp_path / name)


def test_missing_shard(ckpt, tmp_path):
    d = _copy(ckpt, "sharded", tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = f"{shard.name}: shard listed in model.safetensors.index.json is missing"
    with pytest.raises(CheckpointError, match=msg):
        from_pretrained(d)


def test_truncated_and_corrupt_safetensors(ckpt, tmp_path):
    d = _copy(ckpt, "single", tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensors need \d+ bytes"):
        from_pretrained(d)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file"):
        from_pretrained(d)
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        from_pretrained(d)
    f.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors header"):
        from_pretrained(d)


def test_config_errors(ckpt, tmp_path):
    d = _copy(ckpt, "single", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for change, pattern in [
        (dict(model_type="llama"), "config.json: unknown model_type 'llama'; moekit loads mixtral"),
        (dict(hidden_act="gelu"), "config.json: hidden_act 'gelu' is not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope type 'yarn' is not supported"),
        (dict(num_key_value_heads=3), r"config.json: ModelConfig.num_attention_heads \(4\) must be a"),
    ]:
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=pattern):
            from_pretrained(d)
    (d / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        from_pretrained(d)


def test_shape_missing_and_unexpected_tensors(ckpt, tmp_path):
    d = _copy(ckpt, "single", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 44}))
    msg = r"tensor 'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight' \(\+7 more\) in .*model\."
    with pytest.raises(CheckpointError, match=msg + r"safetensors has shape \(40, 32\)"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"have no place in this 1-layer model.*model\.layers\.1\."):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) the config needs.*1\.self_attn\.k_proj"):
        from_pretrained(d)
    del tensors["model.layers.0.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks the up weight of expert 3 under 'model\.layers\.0\.mlp\."):
        from_pretrained(d)


def test_pickle_refused_and_missing_files(tmp_path, ckpt):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(ckpt / "single" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    msg = r"only pickle weights found \(pytorch_model\.bin\); moekit never unpickles.*save_pretrained"
    with pytest.raises(CheckpointError, match=msg):
        from_pretrained(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors, model.safetensors.index.json"):
        from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="neither config.json .* nor params.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        from_pretrained(tmp_path / "absent" / "dir")
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing tokenizer file"):
        load_tokenizer(ckpt / "single")


def test_hub_ids_only_from_the_local_cache(tmp_path, ckpt, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    msg = "moekit works offline.*'someone/tiny-moe' is not there.*hf download"
    with pytest.raises(FileNotFoundError, match=msg):
        from_pretrained("someone/tiny-moe")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)  # "out/x": a local directory "out" exists, so it may be a typo
    with pytest.raises(FileNotFoundError, match=r"out/x: no such local directory \(\./out has no 'x'\)"):
        from_pretrained("out/x")
    repo = tmp_path / "cache" / "models--someone--tiny-moe"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(ckpt / "single", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert from_pretrained("someone/tiny-moe").config.num_experts == 4
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="needs the optional package huggingface_hub"):
        from_pretrained("someone/tiny-moe")


def test_pure_config_maps_name_the_problem():
    with pytest.raises(ValueError, match=r"params\.json: no 'moe' section"):
        mistral_to_kwargs(dict(dim=8, n_layers=1, head_dim=4, hidden_dim=8, n_heads=2, n_kv_heads=1,
                               norm_eps=1e-5, vocab_size=10))
    with pytest.raises(ValueError, match=r"params\.json: required key 'head_dim' is missing"):
        mistral_to_kwargs(dict(dim=8, n_layers=1))
    base = dict(model_type="qwen2_moe", hidden_size=8, num_attention_heads=2, vocab_size=10,
                num_hidden_layers=1, num_experts_per_tok=1, num_experts=2, intermediate_size=8,
                moe_intermediate_size=4)
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        hf_to_kwargs({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="clip_qkv"):
        hf_to_kwargs({**base, "model_type": "olmoe", "clip_qkv": 8.0})
    qwen3 = {**base, "model_type": "qwen3_moe"}
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        hf_to_kwargs({**qwen3, "use_sliding_window": True})
    with pytest.raises(ValueError, match="attention_bias=true is not supported for qwen3_moe"):
        hf_to_kwargs({**qwen3, "attention_bias": True})
    del qwen3["num_experts"]
    with pytest.raises(ValueError, match="required key 'num_experts' is missing"):
        hf_to_kwargs(qwen3)
    assert hf_to_kwargs({**qwen3, "num_local_experts": 3})["num_experts"] == 3  # what transformers 5 writes
    with pytest.raises(ValueError, match="rope type 'linear' is not supported"):  # v5 + a v4 leftover
        hf_to_kwargs({**base, "rope_parameters": {"rope_type": "default"},
                      "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="quantized checkpoints .quant_method 'fp8'. are not supported"):
        hf_to_kwargs({**base, "quantization_config": {"quant_method": "fp8"}})
    assert hf_to_kwargs({**base, "rope_theta": 5e5, "eos_token_id": [7, 3]})["rope_theta"] == 5e5
    assert hf_to_kwargs({**base, "eos_token_id": [7, 3]})["eos_token_id"] == 7
    assert parse_size("20KB") == 20_000 and parse_size("1GiB") == 2**30 and parse_size("10000") == 10_000
    with pytest.raises(ValueError, match="max_shard_size must look like"):
        parse_size("lots")



def test_missing_keys_get_transformers_defaults_per_model_type():
    """What transformers' config classes assume when config.json leaves rms_norm_eps or
    max_position_embeddings out (they differ between model types)."""
    base = dict(hidden_size=8, num_attention_heads=2, vocab_size=10, num_hidden_layers=1,
                num_experts_per_tok=1, intermediate_size=8, moe_intermediate_size=4)
    expected = {"mixtral": (1e-5, 131072), "qwen2_moe": (1e-6, 32768), "qwen3_moe": (1e-6, 32768),
                "olmoe": (1e-5, 4096)}
    for model_type, (eps, context) in expected.items():
        experts = {"num_local_experts" if model_type == "mixtral" else "num_experts": 2}
        kw = hf_to_kwargs({**base, **experts, "model_type": model_type})
        assert (kw["rms_norm_eps"], kw["max_position_embeddings"]) == (eps, context), model_type
        cfg = transformers.AutoConfig.for_model(model_type)  # the reference itself
        assert (cfg.rms_norm_eps, cfg.max_position_embeddings) == (eps, context), model_type


def test_special_token_ids_outside_the_vocabulary_are_dropped_with_a_warning():
    base = dict(model_type="mixtral", hidden_size=8, num_attention_heads=2, vocab_size=10,
                num_hidden_layers=1, num_experts_per_tok=1, num_local_experts=2, intermediate_size=8)
    with pytest.warns(UserWarning, match="pad_token_id=-1 lies outside the vocabulary"):
        assert hf_to_kwargs({**base, "pad_token_id": -1})["pad_token_id"] is None
    with pytest.warns(UserWarning, match="using 2"):
        assert hf_to_kwargs({**base, "eos_token_id": [200, 2]})["eos_token_id"] == 2
