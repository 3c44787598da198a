import numpy as np
import pytest
import torch

from moekit.train.data import TokenStream, validation_batches


def test_epoch_is_a_permutation_of_all_windows():
    tokens = np.arange(10 * 4 + 3, dtype=np.int32)  # 10 windows of 4, 3 tokens left over
    stream = TokenStream(tokens, seq_len=4, batch_size=5, seed=1)
    seen = torch.cat([stream.next_batch(), stream.next_batch()])
    assert seen.shape == (10, 4)
    starts = sorted(int(r[0]) for r in seen)
    assert starts == list(range(0, 40, 4))
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 4)) for r in seen)
    nxt = torch.cat([stream.next_batch(), stream.next_batch()])
    assert sorted(int(r[0]) for r in nxt) == starts and not torch.equal(nxt, seen)  # new order
    assert stream.epoch == 2.0


def test_resume_from_position_reproduces_the_stream():
    tokens = np.random.default_rng(0).integers(0, 100, size=1000).astype(np.int32)
    a = TokenStream(tokens, seq_len=8, batch_size=3, seed=7)
    for _ in range(50):  # crosses several epochs (125 windows)
        a.next_batch()
    state = a.state_dict()
    b = TokenStream(tokens, seq_len=8, batch_size=3, seed=7)
    b.load_state_dict(state)
    for _ in range(60):
        assert torch.equal(a.next_batch(), b.next_batch())
    other = TokenStream(tokens, seq_len=8, batch_size=3, seed=8)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(state)


def test_validation_batches_and_errors():
    tokens = np.arange(100, dtype=np.int32)
    batches = validation_batches(tokens, seq_len=10, batch_size=4, max_batches=2)
    assert [b.shape for b in batches] == [(4, 10), (4, 10)]
    assert torch.equal(batches[0][1], torch.arange(10, 20))
    assert [b.shape[0] for b in validation_batches(tokens, 10, 4, 10)] == [4, 4, 2]
    with pytest.raises(ValueError, match="fewer than one window"):
        validation_batches(tokens[:5], 10, 4, 1)
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenStream(tokens[:5], 10, 1)
    with pytest.raises(ValueError, match="batch_size"):
        TokenStream(tokens, 10, 0)


def test_special_token_text_in_a_document_is_text():
    from moekit.train.data import encode_documents
    from moekit.train.tokenizer import EOS_TOKEN, PAD_TOKEN, eos_token_id, train_tokenizer

    tok = train_tokenizer(["x = 1\nprint(x)\n"] * 20, 300)
    eos = eos_token_id(tok)
    text = f'x = "{EOS_TOKEN}" + "{PAD_TOKEN}"'
    ids = encode_documents(tok, [text, "y"], eos).tolist()
    assert ids.count(eos) == 2 and ids[ids.index(eos) + 2] == eos  # the two documents' ends only
    assert tok.decode(ids[: ids.index(eos)]) == text
    assert not tok.encode_special_tokens  # the tokenizer is left as it was
