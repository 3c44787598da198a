"""moekit-native models (any config HF can express) -> save_pretrained -> transformers: same logits."""

import json

import pytest
import torch

from moekit.hf import from_pretrained
from moekit.models import ModelConfig, MoEForCausalLM

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=24, num_experts=4, top_k=2,
            max_position_embeddings=32, rope_theta=1e4, initializer_range=0.1)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # the zero-width expert
@pytest.mark.parametrize("changes, model_type", [
    (dict(), "mixtral"),
    (dict(sliding_window=4), "mixtral"),
    (dict(norm_topk_prob=False, first_k_dense_replace=1), "qwen2_moe"),  # zero-width shared expert
    (dict(attention_bias=True, shared_expert_intermediate_size=16, shared_expert_gate=True,
          decoder_sparse_step=2, tie_word_embeddings=True), "qwen2_moe"),
    (dict(qk_norm=True, norm_topk_prob=False, moe_intermediate_size=40), "olmoe"),
    (dict(qk_norm="head", head_dim=6, first_k_dense_replace=1, decoder_sparse_step=1), "qwen3_moe"),
    (dict(qk_norm="head", norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True),
     "qwen3_moe"),
])
def test_export_picks_the_matching_model_type(tmp_path, changes, model_type):
    torch.manual_seed(0)
    model = MoEForCausalLM(ModelConfig(**{**BASE, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model(IDS).logits
        assert (hf(IDS).logits - ours).abs().max().item() <= 1e-4
        assert torch.equal(from_pretrained(tmp_path)(IDS).logits, ours)


def test_unexportable_configs_name_the_reason(tmp_path):
    for changes, pattern in [
        (dict(router="expert_choice"), "router='expert_choice'"),
        (dict(qk_norm=True, attention_bias=True), "attention bias, shared expert or dense layers"),
        (dict(qk_norm="head", attention_bias=True), "'qwen3_moe'.*attention bias or shared expert"),
        (dict(capacity_factor=1.25), r"capacity_factor=1.25 \(HF MoE models are dropless\)"),
    ]:
        model = MoEForCausalLM(ModelConfig(**{**BASE, **changes}))
        with pytest.raises(ValueError, match=pattern):
            model.save_pretrained(tmp_path)
    model = MoEForCausalLM(ModelConfig(**{**BASE, "norm_topk_prob": False}))
    with pytest.raises(ValueError, match="cannot be written as HF 'mixtral'.*norm_topk_prob=False"):
        model.save_pretrained(tmp_path, model_type="mixtral")
    for model_type in ("olmoe", "qwen3_moe"):  # both normalise q and k; this model does not
        pattern = f"qk_norm=None .{model_type} always"
        with pytest.raises(ValueError, match=pattern):
            model.save_pretrained(tmp_path, model_type=model_type)
    with pytest.raises(ValueError, match="model_type must be one of"):
        model.save_pretrained(tmp_path, model_type="llama")


def test_convert_a_moekit_training_run(tmp_path):
    from moekit.hf import convert, load_tokenizer
    from moekit.models import get_preset
    from moekit.train import load_run, train

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.py").write_text(f"def add{i}(a, b):\n    return a + b\n" * 20)
    cfg = get_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48, num_experts=4, vocab_size=300,
                     max_position_embeddings=64)
    train(tmp_path / "run", model_config=cfg, data=data, show_progress=False, log=lambda _: None,
          train_changes=dict(max_steps=1, batch_size=2, seq_len=16, eval_every=0, eval_batches=1,
                             warmup_steps=1, save_every=0, tokenizer_chars=5000))
    convert(tmp_path / "run", tmp_path / "hf")
    model, tok, _ = load_run(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("def add(a, b):").ids])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    loaded = load_tokenizer(tmp_path / "hf")
    assert loaded.encode("def add") == tok.encode("def add").ids
    assert loaded.eos_token_id == model.config.eos_token_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("def add(a, b):") == tok.encode("def add(a, b):").ids
    assert hf_tok.eos_token_id == model.config.eos_token_id
    from .builders import tiny_hf, tiny_tokenizer  # over another model's checkpoint: nothing of it stays

    for to in ("hf", "mistral"):
        other = tmp_path / f"other-{to}"
        tiny_hf("mixtral").save_pretrained(other)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), eos_token="<|im_end|>",
                                             chat_template="OTHER").save_pretrained(other)
        (other / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
        convert(tmp_path / "run", other, to=to)
        loaded = load_tokenizer(other)
        assert loaded.chat_template is None and loaded.eos_token_id == model.config.eos_token_id
        generation = other / "generation_config.json"
        assert (json.loads(generation.read_text())["eos_token_id"] == model.config.eos_token_id
                if to == "hf" else not generation.exists())


def test_convert_carries_the_source_tokenizer_and_generation_defaults(tmp_path):
    """The eos list of generation_config.json, named chat templates (additional_chat_templates/),
    and, converting into a directory that held another model, the new model's tokenizer."""
    from moekit.hf import convert, load_tokenizer
    from moekit.hf.chat import stop_token_ids

    from .builders import tiny_hf, tiny_tokenizer

    def checkpoint(path, model_type, eos, templates, eos_ids=None):
        extra = {"eos_token_id": eos_ids} if eos_ids else {}
        tiny_hf(model_type, seed=len(str(path)), **extra).save_pretrained(path)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), eos_token=eos,
                                             chat_template=templates).save_pretrained(path)

    checkpoint(tmp_path / "a", "mixtral", "</s>", "A-TEMPLATE")
    named = {"default": "{{ messages[0].content }}", "tool_use": "TOOLS {{ tools | tojson }}"}
    checkpoint(tmp_path / "b", "qwen2_moe", "<|im_end|>", named, eos_ids=[4, 3])
    convert(tmp_path / "a", tmp_path / "out")
    convert(tmp_path / "b", tmp_path / "out")  # over a converted other model
    tok = load_tokenizer(tmp_path / "out")
    assert tok.special_tokens["eos_token"] == "<|im_end|>"
    assert sorted(tok.chat_template) == ["default", "tool_use"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools).startswith("TOOLS")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [4, 3]
    model = from_pretrained(tmp_path / "out")
    assert {3, 4} <= set(stop_token_ids(model, tok))


def test_saved_tokenizer_files_are_those_of_an_empty_directory(tmp_path):
    """Saving back into the source folder with a new chat template: no stale template file wins."""
    from moekit.hf import load_tokenizer, save_pretrained

    from .builders import tiny_hf, tiny_tokenizer

    old = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), eos_token="<|im_end|>",
                                               chat_template="OLD {{ messages[0].content }}")
    old.save_pretrained(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    tiny_hf("mixtral", vocab_size=400).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    tok.chat_template = "NEW {{ messages[0].content }}"
    save_pretrained(from_pretrained(tmp_path), tmp_path, tokenizer=tok)
    messages = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(tmp_path).apply_chat_template(messages) == "NEW hi"
    peer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert peer.apply_chat_template(messages, tokenize=False) == "NEW hi"
    eos = tok.special_tokens["eos_token"]
    assert peer.eos_token == load_tokenizer(tmp_path).special_tokens["eos_token"] == eos
    assert not any((tmp_path / name).exists() for name in ("special_tokens_map.json", "chat_template.jinja"))


def test_generation_defaults_survive_load_generate_and_save(tmp_path):
    """A checkpoint whose generation_config.json names two eos ids (as Qwen3's does): generate stops on
    either, and save_pretrained writes the file back whole (transformers reads the same eos list)."""
    from moekit.hf import save_pretrained
    from moekit.inference import generate

    from .builders import tiny_hf

    tiny_hf("qwen3_moe").save_pretrained(tmp_path / "src")
    model = from_pretrained(tmp_path / "src")
    free = generate(model, [[1, 2, 3]], 12, stop_token_ids=())[0]
    stop = free[4]
    unused = next(i for i in range(1, 96) if i not in free)
    defaults = {"eos_token_id": [unused, stop], "pad_token_id": 0, "do_sample": True, "temperature": 0.6}
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(defaults))
    model = from_pretrained(tmp_path / "src")
    assert model.generation_config == defaults
    assert generate(model, [[1, 2, 3]], 12)[0] == free[:free.index(stop)]
    save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == defaults
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [unused, stop]
    assert from_pretrained(tmp_path / "out").generation_config == defaults

    (tmp_path / "src" / "generation_config.json").unlink()  # then config.json's ids, an eos list kept
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "eos_token_id": [stop, unused]}))
    model = from_pretrained(tmp_path / "src")
    assert model.config.eos_token_id == stop
    assert model.generation_config == {"eos_token_id": [stop, unused], "pad_token_id": 0}
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [stop, unused]


def test_save_pretrained_takes_a_plain_tokenizer_and_refuses_others_before_writing(tmp_path):
    """The tokenizers.Tokenizer of load_run works as is (eos from the config); another type raises
    before the directory is touched."""
    from moekit.hf import load_tokenizer, save_pretrained

    from .builders import tiny_tokenizer

    tok = tiny_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    model = MoEForCausalLM(ModelConfig(**{**BASE, "vocab_size": tok.get_vocab_size(), "eos_token_id": eos}))
    save_pretrained(model, tmp_path / "out", tokenizer=tok)
    assert load_tokenizer(tmp_path / "out").eos_token_id == eos
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "<|im_end|>"
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(TypeError, match="HFTokenizer or a tokenizers.Tokenizer, got str"):
        model.save_pretrained(tmp_path / "out", tokenizer="tokenizer.json", dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
