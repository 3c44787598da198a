"""generate / generate_text: greedy = argmax of full recomputation, batch = single, stops, streaming."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from moekit.inference import generate, generate_text
from moekit.models import ModelConfig, MoEForCausalLM


def make_model(seed=0, **kw):
    base = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts=4,
        top_k=2,
        max_position_embeddings=48,
        rope_theta=1e4,
    )
    base.update(kw)
    torch.manual_seed(seed)
    model = MoEForCausalLM(ModelConfig(**base)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_equals_full_recomputation():
    model = make_model(sliding_window=5)
    prompt = [3, 17, 5, 9, 22, 1, 30]
    assert generate(model, [prompt], 12) == [greedy_without_cache(model, prompt, 12)]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20, top_p=0.95, seed=11)])
def test_batch_equals_single_prompts(sampling):
    model = make_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batch = generate(model, prompts, 10, **sampling)
    for b, p in enumerate(prompts):
        single = dict(sampling, seed=sampling["seed"] + b) if "seed" in sampling else sampling
        assert generate(model, [p], 10, **single) == [batch[b]]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = make_model()
    runs = [generate(model, [[1, 2, 3]], 15, temperature=1.5, seed=s) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_token_ids_and_streaming():
    model = make_model()
    full = generate(model, [[4, 5, 6]], 12)[0]
    stop = full[4]
    first = full.index(stop)
    seen = []
    got = generate(
        model, [[4, 5, 6]], 12, stop_token_ids=[stop], on_token=lambda row, t: seen.append((row, t))
    )
    assert got == [full[:first]]
    assert seen == [(0, t) for t in full[:first]]


def test_eos_from_config_is_the_default_stop():
    model = make_model()
    full = generate(model, [[4, 5, 6]], 12)[0]
    model_eos = make_model(eos_token_id=full[2])
    assert generate(model_eos, [[4, 5, 6]], 12) == [full[: full.index(full[2])]]
    assert generate(model_eos, [[4, 5, 6]], 12, stop_token_ids=[]) == [full]


def test_callback_can_stop_a_row_and_others_go_on():
    model = make_model()
    out = generate(model, [[1, 2], [3, 4]], 8, on_token=lambda row, t: row == 0)
    assert len(out[0]) == 1 and len(out[1]) == 8


def test_training_mode_is_restored():
    model = make_model().train()
    generate(model, [[1, 2]], 2)
    assert model.training


@pytest.mark.parametrize(
    "args, match",
    [
        (([[1] * 40], 10), "exceeds the context"),
        (([[1] * 48], 2), "exceeds the context"),
        (([], 3), "non-empty list"),
        (([[]], 3), r"prompt_ids\[0\]"),
        (([[1, 99]], 3), "vocab_size"),
        (([[1]], 0), "max_new_tokens"),
    ],
)
def test_generate_errors(args, match):
    with pytest.raises(ValueError, match=match):
        generate(make_model(), *args)


def test_the_whole_context_is_usable():
    """48 positions: a 48-token prompt gets one new token, 47 tokens get two (the last new token
    is never fed back), equal to the argmax of the full forward."""
    model = make_model().eval()
    prompt = [[(7 * i) % 39 + 1 for i in range(48)]]
    with torch.no_grad():
        expected = int(model(torch.tensor(prompt)).logits[0, -1].argmax())
    assert generate(model, prompt, 1, stop_token_ids=[]) == [[expected]]
    assert len(generate(model, [prompt[0][:47]], 2, stop_token_ids=[])[0]) == 2


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_non_finite_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        generate(make_model(), [[1, 2]], 2, temperature=temperature)


def test_cache_longer_than_the_context_is_refused():
    from moekit.inference import StaticKVCache

    cfg = make_model().config
    StaticKVCache(cfg, 2, 50, pad_lengths=[2, 3])  # positions up to 47: fits 48
    with pytest.raises(ValueError, match="beyond the context"):
        StaticKVCache(cfg, 1, 49)


def test_numpy_token_ids_are_token_ids():
    import numpy as np

    model = make_model()
    assert generate(model, [list(np.array([1, 2, 3]))], 4) == generate(model, [[1, 2, 3]], 4)


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]"] + [f"w{i}" for i in range(39)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_generate_text_streams_and_cuts_at_stop_strings():
    model, tok = make_model(), word_tokenizer()
    prompt = tok.encode("w1 w2 w3").ids
    ids = generate(model, [prompt], 10)[0]
    text = " " + tok.decode(ids)  # the text after the prompt: decode(prompt + ids) = "w1 w2 w3" + text
    assert tok.decode(prompt + ids) == "w1 w2 w3" + text
    assert generate_text(model, tok, "w1 w2 w3", 10) == [text]
    words = text.split(" ")[1:]
    stop = " ".join(words[3:5])  # a two-word stop string from the middle of the text
    cut = text[: text.index(stop)]
    pieces = []
    got = generate_text(
        model,
        tok,
        ["w1 w2 w3", "w7"],
        10,
        stop=[stop, "never-there"],
        stream=lambda row, s: pieces.append((row, s)),
    )
    assert got[0] == cut
    assert "".join(s for row, s in pieces if row == 0) == cut
    assert "".join(s for row, s in pieces if row == 1) == got[1]
    assert got[1] == generate_text(model, tok, "w7", 10, stop=[stop, "never-there"])[0]


def test_generate_text_errors():
    model, tok = make_model(), word_tokenizer()
    with pytest.raises(ValueError, match="prompts"):
        generate_text(model, tok, [], 3)
    with pytest.raises(ValueError, match="stop"):
        generate_text(model, tok, "w1", 3, stop=[""])
    with pytest.raises(ValueError, match="no tokens"):
        generate_text(model, tok, "", 3)


def test_byte_level_stream_equals_final_text():
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "def f(x):\n    return x * 2  # größer → 😀\n" * 20
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    model = make_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=64)
    pieces = []
    got = generate_text(
        model, tok, "def f", 30, temperature=1.0, seed=0, stream=lambda r, s: pieces.append(s)
    )
    assert "".join(pieces) == got[0]
    # A 4-byte character split over byte tokens is streamed only once complete.
    from moekit.inference.text import _RowText

    row = _RowText(tok, stops=[])
    ids = tok.encode("a😀").ids
    assert len(ids) >= 3  # the emoji spans several byte tokens
    assert [row.push(t) for t in ids[:-1]][1:] == [""] * (len(ids) - 2)
    assert "".join([row.push(ids[-1]), row.flush()]).endswith("😀")


def metaspace_tokenizer():
    """Llama / Mistral's kind: Metaspace pieces, byte fallback, a decoder that strips the leading space."""
    from tokenizers import decoders, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "▁The", "▁capital", "▁is", "▁Paris", "▁hi"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def test_metaspace_byte_fallback_text_keeps_the_space_and_streams_whole_characters(monkeypatch):
    """The first new token's space survives (transformers: decode(prompt + new) minus the prompt), and
    a character of four byte tokens (four U+FFFD until complete) streams once, whole."""
    import moekit.inference.text as text_module
    from moekit import HFTokenizer

    tok = metaspace_tokenizer()
    new = [tok.token_to_id(t) for t in ["▁Paris", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁hi"]]

    def fake_generate(model, prompt_ids, max_new_tokens, on_token, **kwargs):  # the model's choice, fixed
        for t in new:
            if on_token(0, t):
                break

    monkeypatch.setattr(text_module, "generate", fake_generate)
    prompt = "The capital is"
    reference = tok.decode(tok.encode(prompt).ids + new)
    assert reference == "The capital is Paris 😀 hi"
    for wrapped in (tok, HFTokenizer(tok)):  # a tokenizers.Tokenizer or moekit.load_tokenizer's
        pieces: list[str] = []
        got = text_module.generate_text(None, wrapped, prompt, 10, stream=lambda r, s, p=pieces: p.append(s))
        assert prompt + got[0] == reference
        assert "".join(pieces) == got[0] and "\ufffd" not in "".join(pieces)
    tok.add_special_tokens(["[/INST]"])  # a prompt ending in a special token (decoded as nothing)
    prompt = "The capital is[/INST]"
    assert tok.id_to_token(tok.encode(prompt).ids[-1]) == "[/INST]"
    got = text_module.generate_text(None, tok, prompt, 10)[0]
    assert got == tok.decode(tok.encode(prompt).ids + new)[len("The capital is"):] == " Paris 😀 hi"
    # A stop string whose next character is still pending (U+FFFD) is not streamed in part.
    pieces = []
    got = text_module.generate_text(None, tok, "The capital is", 10, stop=["s 😀"],
                                    stream=lambda r, s: pieces.append(s))
    assert got == [" Pari"] and "".join(pieces) == " Pari"


@pytest.mark.parametrize("kw", [dict(capacity_factor=1.0), dict(router="expert_choice")])
def test_routing_that_couples_tokens_warns(kw, recwarn):
    model = make_model(**kw)
    with pytest.warns(UserWarning, match="a row's continuation depends on the rest of the batch"):
        generate(model, [[1, 2, 3]], 2)
    generate(make_model(), [[1, 2, 3]], 2)  # dropless top-k: no warning
    assert not [w for w in recwarn if "continuation depends" in str(w.message)]


def test_a_special_token_as_stop_string_stops_at_its_id(monkeypatch):
    import moekit.inference.text as text_module

    tok = word_tokenizer()
    tok.add_special_tokens(["<|im_end|>"])
    end = tok.token_to_id("<|im_end|>")
    seen = {}

    def fake_generate(model, prompt_ids, max_new_tokens, on_token, stop_token_ids=None, **kwargs):
        seen["stop_token_ids"] = stop_token_ids

    monkeypatch.setattr(text_module, "generate", fake_generate)
    model = make_model(eos_token_id=2)
    text_module.generate_text(model, tok, "w1", 4, stop=["<|im_end|>", "w9"])
    assert seen["stop_token_ids"] == [2, end]  # the model's eos kept
    text_module.generate_text(model, tok, "w1", 4, stop=["<|im_end|>"], stop_token_ids=[7])
    assert seen["stop_token_ids"] == [7, end]
    text_module.generate_text(model, tok, "w1", 4, stop=["w9"])
    assert seen["stop_token_ids"] is None  # not special: matched in the text
