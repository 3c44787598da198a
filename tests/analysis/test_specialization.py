"""Token categories of Python code mapped onto BPE tokens, mutual information, per-expert tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis.data import balanced_cap, encode_windows, is_python
from moekit.analysis.specialization import (
    CATEGORIES,
    category_entropy,
    mutual_information,
    python_char_categories,
    shuffled_mutual_information,
    token_categories,
    top_tokens,
)

SRC = (
    "class Stack:\n"
    "    def push(self, x=1.5):  # add\n"
    "        self.items.append('a' + x)\n"
    "\n"
    "    def pop(self):\n"
    "        return self.items.pop()\n"
)


def cat_of(cats: np.ndarray, src: str, needle: str, offset: int = 0) -> str:
    i = src.index(needle) + offset
    return CATEGORIES[cats[i]]


def test_python_char_categories():
    cats = python_char_categories(SRC)
    assert len(cats) == len(SRC)
    assert cat_of(cats, SRC, "class") == "keyword"
    assert cat_of(cats, SRC, "Stack") == "name"
    assert cat_of(cats, SRC, "self") == "name"
    assert cat_of(cats, SRC, "=1.5") == "operator"
    assert cat_of(cats, SRC, "1.5") == "number"
    assert cat_of(cats, SRC, "# add") == "comment"
    assert cat_of(cats, SRC, "'a'") == "string"
    assert cat_of(cats, SRC, ":\n") == "operator"
    assert cat_of(cats, SRC, ":\n", 1) == "newline"
    assert cat_of(cats, SRC, "    def push") == "indentation"
    assert cat_of(cats, SRC, "        return") == "indentation"
    assert cat_of(cats, SRC, " Stack") == "whitespace"
    assert cat_of(cats, SRC, "return") == "keyword"


def test_invalid_python_tail_is_unknown():
    src = "x = 1\ny = (\n"
    cats = python_char_categories(src)
    assert CATEGORIES[cats[0]] == "name"
    src = 'x = 1\ns = """abc\n'  # unterminated string: unknown after the last complete token
    bad = python_char_categories(src)
    cut = src.index(' """')
    assert (bad[:cut] >= 0).all() and (bad[cut:] == -1).all()
    src = "if x:\n        y\n    z = 1\n"  # dedent to no enclosing level
    bad = python_char_categories(src)
    assert (bad[:src.index("y")] >= 0).all() and (bad[src.index("z"):] == -1).all()
    assert not is_python("x = 1\n  y = 2\n") and is_python(SRC)


def test_a_python_file_cut_short_is_still_python():
    """As a character budget cuts the last document of a split: mid-line, or inside a docstring."""
    import inspect

    import moekit.analysis.metrics as module

    source = inspect.getsource(module)
    for cut in (len(source) * 3 // 4 + 7, source.index('"""', len(source) // 2) + 10):
        assert is_python(source[:cut])
    assert not is_python("It's plain English, not code.\n" * 40)
    assert not is_python(source[: len(source) // 3] + "It's plain English (unbalanced\n" * 2000)


def test_sample_pieces_mark_separators_only(bpe):
    text = "s = '日本語'  # 🎉\n"
    tok = bpe(["s = 'abc'  # x\n" * 3])  # the characters above never seen: byte tokens
    sep = tok.token_to_id("<|endoftext|>")
    w = encode_windows(tok, [text, text], seq_len=4, max_tokens=10_000, separator_id=sep, sample_tokens=1000)
    flat = w.ids_NS.reshape(-1).tolist()
    separators = [i for i, t in enumerate(flat) if t == sep]
    assert [i for i, p in enumerate(w.sample_pieces) if p is None] == separators
    assert "" in w.sample_pieces  # multi-byte characters: tokens that add no character of their own
    shown = "".join(p for p in w.sample_pieces if p is not None)
    assert shown == (text * 2)[: len(shown)]


def test_token_categories_from_offsets():
    cats = python_char_categories(SRC)
    offsets = [(SRC.index(" Stack"), SRC.index(" Stack") + 6),      # " Stack": blank + name -> name
               (SRC.index(":\n") + 1, SRC.index(":\n") + 6),         # "\n    ": newline + indentation
               (SRC.index("        return"), SRC.index("        return") + 4),  # indentation only
               (SRC.index("self"), SRC.index("self")),               # empty span
               (SRC.index("self."), SRC.index("self.") + 5)]         # "self." name 4 chars vs op 1
    got = [CATEGORIES[c] if c >= 0 else None for c in token_categories(cats, offsets)]
    assert got == ["name", "newline", "indentation", None, "name"]


def test_encode_windows_with_bpe_offsets(bpe):
    prose = "It's plain English, not code: (unbalanced\n" * 3
    tok = bpe([SRC * 4, prose])
    sep = tok.token_to_id("<|endoftext|>")
    w = encode_windows(tok, [SRC, prose, SRC], seq_len=16, max_tokens=10_000, separator_id=sep,
                       sample_tokens=1000)
    assert (w.documents, w.python_documents) == (3, 2)
    assert w.ids_NS.shape[1] == 16 and w.ids_NS.shape == w.categories_NS.shape
    n_src = len(tok.encode(SRC).ids)
    flat_c = w.categories_NS.reshape(-1)
    assert (flat_c[:n_src] >= 0).all() and flat_c[n_src] == -1  # separator is unknown
    assert w.ids_NS.reshape(-1)[n_src] == sep
    assert "".join(w.sample_pieces[:n_src]) == SRC and w.sample_pieces[n_src] is None
    assert len(w.sample_pieces) == w.num_tokens  # the whole stream fits in the sample here
    short = encode_windows(tok, [SRC], seq_len=16, max_tokens=10_000, sample_tokens=7)
    assert short.sample_pieces == w.sample_pieces[:7]
    capped = encode_windows(tok, [SRC, prose, SRC], seq_len=16, max_tokens=10_000, separator_id=sep,
                            max_doc_tokens=20)
    assert capped.num_tokens == 3 * 21 // 16 * 16  # 20 tokens + separator per document
    np.testing.assert_array_equal(capped.ids_NS.reshape(-1)[:20], w.ids_NS.reshape(-1)[:20])
    assert capped.ids_NS.reshape(-1)[20] == sep and capped.sample_pieces[:20] == w.sample_pieces[:20]
    assert capped.sample_pieces[20] is None
    lengths = [len(tok.encode(t).ids) for t in (SRC, prose, SRC)]
    balanced = encode_windows(tok, [SRC, prose, SRC], seq_len=16, max_tokens=64, separator_id=sep,
                              max_doc_tokens="balanced")
    cap = balanced_cap(lengths, 64, extra=1)
    assert sum(min(n, cap) + 1 for n in lengths) >= 64 > sum(min(n, cap - 1) + 1 for n in lengths)
    assert balanced.num_tokens == 64 and balanced.documents == 3
    kw = [p.strip() for p, c in zip(w.sample_pieces[:n_src], flat_c) if CATEGORIES[c] == "keyword"]
    assert len(kw) >= 4 and all(any(k in word for word in ("class", "def", "return")) for k in kw)
    with pytest.raises(ValueError, match="fewer than one window"):
        encode_windows(tok, ["x"], seq_len=16, max_tokens=100)
    with pytest.raises(ValueError, match="max_tokens"):
        encode_windows(tok, [SRC], seq_len=16, max_tokens=8)


def test_balanced_cap():
    assert balanced_cap([100, 10, 1000], 300) == 190  # 100 + 10 + 190
    for lengths, budget, extra in (([100, 10, 1000], 300, 0), ([5, 5], 100, 1), ([50, 60, 70], 90, 1)):
        c = balanced_cap(lengths, budget, extra)
        total = sum(min(n, c) + extra for n in lengths)
        assert total >= budget or c == max(lengths)
        assert c == 1 or sum(min(n, c - 1) + extra for n in lengths) < budget


def test_mutual_information_known_values():
    assert mutual_information(np.diag([10, 10, 10, 10])) == pytest.approx(2.0)
    assert mutual_information(np.full((3, 4), 7)) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(np.zeros((2, 2))) == 0.0
    assert category_entropy(np.diag([5, 5])) == pytest.approx(1.0)
    t = np.array([[30, 10], [5, 55]])
    p = t / t.sum()
    ref = sum(p[i, j] * math.log2(p[i, j] / p[i].sum() / p[:, j].sum()) for i in range(2) for j in range(2))
    assert mutual_information(t) == pytest.approx(ref)


def test_shuffled_baseline_keeps_margins_and_is_near_zero():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 200, size=(6, 8))
    mean, std = shuffled_mutual_information(t, n_shuffles=10, seed=1)
    # bias of the plug-in MI under independence ~ (R-1)(C-1) / (2 N ln 2) bits
    bias = 5 * 7 / (2 * t.sum() * math.log(2))
    assert 0 <= mean < 3 * bias and std >= 0
    assert mutual_information(np.diag([100] * 4)) > 100 * shuffled_mutual_information(np.diag([100] * 4))[0]
    with pytest.raises(ValueError, match="n_shuffles"):
        shuffled_mutual_information(t, n_shuffles=0)


def test_top_tokens_frequent_and_distinctive():
    te = np.array([[50, 30, 0, 20], [50, 0, 40, 10]])
    out = top_tokens(te, lambda i: f"t{i}", k=2, min_count=1)
    assert [t for t, _ in out[0]["frequent"]] == ["t0", "t1"]
    assert out[0]["frequent"][0][1] == pytest.approx(0.5)
    assert out[0]["distinctive"][0][0] == "t1"  # only expert 0 takes t1
    assert out[1]["distinctive"][0][0] == "t2"
    assert out[1]["distinctive"][0][1] == pytest.approx(1 / (100 / 200))


def test_documents_past_the_last_window_are_not_counted():
    from .conftest import train_bpe

    prose, code = "the quick brown fox jumps over the lazy dog ", "x = 1\n"
    tok = train_bpe([prose, code], vocab=120)
    n = len(tok.encode(prose).ids)  # one window holds the prose (and the separator goes past it)
    windows = encode_windows(tok, [prose, code], n, 2 * n, separator_id=tok.token_to_id("<|endoftext|>"))
    assert windows.ids_NS.shape == (1, n)
    assert (windows.documents, windows.python_documents) == (1, 0)
