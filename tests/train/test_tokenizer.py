import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.train.tokenizer import EOS_TOKEN, eos_token_id, load_tokenizer, save_tokenizer, train_tokenizer

from .conftest import TEXT

_TOKENIZER = train_tokenizer([TEXT * 20, "x = [1, 2, 3]\nprint(x)\n" * 10], 400)


def test_trained_vocab_and_special_tokens():
    vocab = _TOKENIZER.get_vocab_size()
    assert 256 + 2 < vocab <= 400  # merges were learned; never more than asked
    assert eos_token_id(_TOKENIZER) == 0
    assert _TOKENIZER.id_to_token(0) == EOS_TOKEN
    # learned merges make frequent text shorter than its bytes
    assert len(_TOKENIZER.encode(TEXT).ids) < len(TEXT.encode()) / 2


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(text):
    assert _TOKENIZER.decode(_TOKENIZER.encode(text).ids) == text


def test_max_chars_is_a_deterministic_prefix():
    a = train_tokenizer([TEXT * 50], 350, max_chars=500)
    b = train_tokenizer([TEXT * 50], 350, max_chars=500)
    c = train_tokenizer([(TEXT * 50)[:500]], 350)
    assert a.to_str() == b.to_str() == c.to_str()


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(_TOKENIZER, path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left
    loaded = load_tokenizer(path)
    assert loaded.encode(TEXT).ids == _TOKENIZER.encode(TEXT).ids
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    path.write_text(path.read_text()[:1000])  # damaged
    with pytest.raises(ValueError, match="tokenizer.json: cannot load tokenizer"):
        load_tokenizer(path)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([TEXT], 100)
